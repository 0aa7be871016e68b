from moefy.arch.base import Family

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks=("model.layers",),
    ffn="mlp",
    w_in="mlp.gate_proj",
    w_up="mlp.up_proj",
    w_out="mlp.down_proj",
    act_attr="hidden_act",
)
