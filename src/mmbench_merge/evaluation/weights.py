"""Put merged weights, held in memory under their checkpoint names, into an already loaded model.

transformers 5 renames checkpoint tensors when it loads a model (Qwen2-VL's `model.layers.0...` is the
module's `model.language_model.layers.0...`) and renames them back when it saves. We ask transformers for
that save-time renaming (`revert_weight_conversion`) over the model's own parameters, so the mapping is
exactly the one `save_pretrained` would write, and copy each merged tensor into its parameter in place.
Every parameter must receive a tensor (tied ones through the tensor they share) and every merged tensor
must land somewhere: a name mismatch is an error, never a silently half-merged model.
"""

from __future__ import annotations

from .. import MergeError
from ..families import checkpoint_names


def load_into_model(model, state_dict: dict, *, source: str = "merged weights") -> int:
    """Copy `state_dict` (checkpoint names -> tensors) into `model`'s parameters; returns the count copied."""
    import torch

    mapping = checkpoint_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    used: set[str] = set()
    filled: set[int] = set()  # storages written (tied parameters share one)
    missing = []
    with torch.no_grad():
        for module_name, target in {**buffers, **params}.items():
            checkpoint_name = mapping.get(module_name, module_name)
            value = state_dict.get(checkpoint_name)
            if value is None and module_name in state_dict:
                checkpoint_name, value = module_name, state_dict[module_name]
            if value is None:
                if module_name in params:
                    missing.append(module_name)
                continue  # non-persistent buffers (rotary caches) are not in checkpoints
            if tuple(value.shape) != tuple(target.shape):
                raise MergeError(
                    f"{source}: tensor {checkpoint_name} has shape {list(value.shape)}, the model's "
                    f"{module_name} has {list(target.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            used.add(checkpoint_name)
            filled.add(target.data_ptr())
    unfilled = [name for name in missing if params[name].data_ptr() not in filled]
    if unfilled:
        raise MergeError(f"{source}: no tensor for the model's parameter {unfilled[0]} ({len(unfilled)} in all)")
    unused = sorted(set(state_dict) - used)
    if unused:
        raise MergeError(f"{source}: tensor {unused[0]} matches no parameter of the model ({len(unused)} in all)")
    return len(used)
