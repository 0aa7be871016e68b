from moefy.arch.base import Family

# Gemma: GeGLU with the tanh-approximated GELU (config.hidden_activation); Gemma 2 and 3 add norms
# before and after the FFN, outside the `mlp` module the MoE layer replaces, so they stay as they are.
GEMMA = Family(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    blocks=("model.layers",),
    ffn="mlp",
    w_in="mlp.gate_proj",
    w_up="mlp.up_proj",
    w_out="mlp.down_proj",
    act_attr="hidden_activation|hidden_act",  # Gemma 1 configs name it hidden_act
)
