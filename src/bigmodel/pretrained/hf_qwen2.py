"""Qwen2 and Qwen2.5 (`model_type: qwen2`, Qwen2ForCausalLM): the Llama layout with biases on the
query, key and value projections (always; none on the output projection or the MLP)."""

from bigmodel.pretrained.hf_llama import Variant, family

QWEN2 = Variant(
    "qwen2",
    "Qwen2ForCausalLM",
    qkv_bias=True,
    proj_bias=False,
    mlp_bias=False,
    qk_norm=False,
    max_positions=32768,
    window="qwen",
)
FAMILY = family(QWEN2)
