"""The FFN activation functions moefy supports, by name (Hugging Face config names map onto them)."""

import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

# Names used by Hugging Face configs for the same functions.
ACTIVATION_ALIASES = {
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def activation_name(name: str) -> str:
    """The moefy name of an activation (a Hugging Face alias resolved); ValueError if unsupported."""
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported FFN activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return name
