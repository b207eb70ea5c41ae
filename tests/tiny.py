"""Command-line settings of a tiny model that trains in seconds on a CPU (shared by the tests)."""

TINY = [
    "--set", "model.gf_dim=8", "--set", "model.df_dim=4", "--set", "model.embedding_dim=16",
    "--set", "model.word_dim=8", "--set", "model.z_dim=8", "--set", "model.condition_dim=8",
    "--set", "train.encoder_batch_size=8", "--set", "train.batch_size=4", "--threads", "1", "--log-every", "1",
]  # fmt: skip
