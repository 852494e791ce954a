"""brillm: BriLLM, the brain-inspired graph language model, native to Hugging Face transformers.

Importing this package registers BriLLM with the Auto classes, so checkpoints load without remote code:

```python
>>> import modeling_brillm
>>> from transformers import AutoConfig
>>> AutoConfig.for_model("brillm", vocab_size=8, hidden_size=4).num_slots
65

```
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_brillm import BriLLMConfig
from .graph_brillm import BriLLMEdgeGraph, dense_graph
from .modeling_brillm import BriLLMForCausalLM, BriLLMModel, BriLLMPreTrainedModel
from .signal_brillm import BriLLMCache, sinusoidal_positions

AutoConfig.register(BriLLMConfig.model_type, BriLLMConfig, exist_ok=True)
AutoModel.register(BriLLMConfig, BriLLMModel, exist_ok=True)
AutoModelForCausalLM.register(BriLLMConfig, BriLLMForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "BriLLMCache",
    "BriLLMConfig",
    "BriLLMEdgeGraph",
    "BriLLMForCausalLM",
    "BriLLMModel",
    "BriLLMPreTrainedModel",
    "dense_graph",
    "sinusoidal_positions",
]
