from moefy.arch.base import Family

# BERT splits its FFN: `intermediate` (dense + act) and `output` (dense, dropout, LayerNorm with the
# residual). The MoE layer replaces `intermediate` and returns the FFN output; `output.dense`
# becomes the identity so the dropout, residual and LayerNorm stay as they are.
BERT = Family(
    name="bert",
    model_types=("bert",),
    blocks=("bert.encoder.layer", "encoder.layer"),
    ffn="intermediate",
    w_in="intermediate.dense",
    w_up=None,
    w_out="output.dense",
    act_attr="hidden_act",
    causal=False,
    identity=("output.dense",),
)
