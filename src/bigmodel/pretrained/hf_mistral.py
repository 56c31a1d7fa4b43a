"""Mistral (`model_type: mistral`, MistralForCausalLM): the Llama layout without biases; v0.1's
4096-token sliding window caps the context (v0.2 and later have none)."""

from bigmodel.pretrained.hf_llama import Variant, family

MISTRAL = Variant(
    "mistral",
    "MistralForCausalLM",
    qkv_bias=False,
    proj_bias=False,
    mlp_bias=False,
    qk_norm=False,
    max_positions=4096 * 32,
    window="mistral",
)
FAMILY = family(MISTRAL)
