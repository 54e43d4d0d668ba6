"""The language-model side: backbones, hybrid prompts, instance-wise LoRA experts, scoring."""
