from moefy.arch.base import Family

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks=("transformer.h",),
    ffn="mlp",
    w_in="mlp.c_fc",
    w_up=None,
    w_out="mlp.c_proj",
    act_attr="activation_function",
    conv1d=True,
)
