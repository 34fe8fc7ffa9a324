"""Conversion of Suno's original Bark release (GPT checkpoints and EnCodec) to our model folder."""
