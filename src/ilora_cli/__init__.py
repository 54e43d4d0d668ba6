"""ilora: instance-wise LoRA sequential recommendation with language models."""

__version__ = "0.1.0"
