"""Tiny MR-PLIP overrides shared by tests: every tower 1 layer of width 32, 32 px images."""

TINY = [  # with a text vocabulary of 128 (tests without a tokenizer)
    "model.vision.overrides.width=32", "model.vision.overrides.depth=1",
    "model.vision.overrides.num_heads=2", "model.vision.overrides.mlp_dim=64",
    "model.text.overrides.width=32", "model.text.overrides.depth=1",
    "model.text.overrides.num_heads=2", "model.text.overrides.mlp_dim=64",
    "model.text.overrides.vocab_size=128", "model.fusion.width=32", "model.fusion.depth=1",
    "model.fusion.num_heads=2", "model.fusion.mlp_dim=64", "model.embed_dim=16",
    "model.projector_dims=(32, 32, 32)", "model.predictor_dims=(8, 32)",
    "input.image_size=32", "input.context_length=8", "input.max_keywords=6", "batch_size=8",
]
