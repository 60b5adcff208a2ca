"""Data: the synthetic language with a known optimum (markov), the encoder's tasks built on it
(encoder: classification, MLM masking), TFDS pipelines for real data (tfds), tokenizers.
`python -m experiments.data` shows the synthetic source."""
