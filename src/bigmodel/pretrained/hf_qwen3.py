"""Qwen3 (`model_type: qwen3`, Qwen3ForCausalLM): the Llama layout with QK-norm (an RMSNorm over
each query and key head, before the rotation) and a head_dim of its own (128 unless config.json
says otherwise)."""

from bigmodel.pretrained.hf_llama import Variant, family

QWEN3 = Variant(
    "qwen3",
    "Qwen3ForCausalLM",
    qkv_bias="attention_bias",
    proj_bias="attention_bias",
    mlp_bias=False,
    qk_norm=True,
    head_dim=128,
    max_positions=32768,
    window="qwen",
)
FAMILY = family(QWEN3)
