"""PyTorch's default initialisers, so a freshly built model starts where the official one
does (``nn.Linear`` / ``nn.Conv2d``: kaiming_uniform(a=sqrt 5) weights, U(+-1/sqrt(fan_in))
biases; torchvision ResNet convs: kaiming_normal(fan_out))."""

import jax
import jax.numpy as jnp
from flax import linen as nn

# torchvision ResNet convs: kaiming_normal_(mode="fan_out", nonlinearity="relu").
resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# kaiming_uniform(a=sqrt 5) == U(+-sqrt(1/fan_in)): nn.Linear / nn.Conv2d weights.
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def uniform(bound: float):
  """U(-bound, bound); PyTorch's bias init with ``bound = 1/sqrt(fan_in)``."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
