"""A CUDA rehearsal without a GPU: a stage's ``main()`` with every model on a fake ``cuda`` device.

Run in a workspace that holds the stage's inputs and a params.yaml with ``common.device: cuda``:
``python -m tests.cuda_rehearsal train_stage1_appearance``. It prints ``rehearsed <stage>`` and exits 0
when the stage got through all of its steps (and how often training drew latents from the VAE posteriors).

How: PyTorch's ``FakeTensorMode`` is entered when the stage loads its model; the weights are read for
real (on the CPU, from their files) and the stage's own code moves them to ``cuda`` (``common.device``). From there on every tensor is a
fake one that carries a device, a shape and a dtype but no data, and every op checks its operands'
devices as CUDA would: a CPU tensor (other than a 0-dim one) mixed with CUDA tensors raises
``FakeTensorDeviceMismatchError``, exactly the error a GPU run would stop with. What a fake tensor cannot
do is stood in for, and only that:

- values (``item``, ``tolist``, ``numpy``) read as zeros, so losses log as 0 and images come out black;
- weight files are read as real CPU tensors (``from_pretrained``, a LoRA's safetensors file);
- ``module.to`` puts new Parameters in place instead of swapping them (fake tensors cannot be swapped);
- ``accelerator.backward`` gives every trained parameter a zero gradient on its own device (the autograd
  engine needs a CUDA driver for CUDA tensors), so clipping and the optimizer step still run on ``cuda``;
- ``accelerator.reduce`` refuses a tensor that is not on ``accelerator.device``, as NCCL does;
- accelerate is told its device is ``cuda`` (it sees no GPU and would otherwise pick the CPU);
- checkpoints are not written, and training stops with ``Rehearsed`` when the stage writes its summary, after the last step: weights with
  no data cannot be saved. Sampling runs to the end and writes its (black) images.

Precision stays fp32: CUDA autocast is off without a GPU, so half precision is rehearsed on the CPU
(bf16) instead.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32, torch.float64: np.float64,
         torch.uint8: np.uint8, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}  # fmt: skip


class Rehearsed(Exception):
    """A training stage got through every step."""


def _values_read_as_zeros() -> None:
    from torch._subclasses import fake_impls

    def zero(fake_mode, func, arg):  # a scalar's value (``item``, or indexing with a 0-dim tensor)
        return False if arg.dtype == torch.bool else 0.0 if arg.dtype.is_floating_point else 0

    for op in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default):
        fake_impls.op_implementations_dict[op] = zero
    FakeTensor.tolist = lambda self: np.zeros(tuple(self.shape), NUMPY.get(self.dtype, np.float32)).tolist()
    FakeTensor.numpy = lambda self, **kwargs: np.zeros(tuple(self.shape), NUMPY.get(self.dtype, np.float32))


def _modules_move_by_new_parameters() -> None:
    """``module.to(...)`` puts new Parameters in place (torch's future behaviour) instead of swapping tensors in
    place, which fake tensors refuse (the fake mode holds weak references to them)."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self.children():
                module._apply(fn)
        for key, param in self._parameters.items():
            if param is not None:
                with torch.no_grad():
                    moved = torch.nn.Parameter(fn(param), requires_grad=param.requires_grad)
                if param.grad is not None:
                    moved.grad = fn(param.grad)
                self._parameters[key] = moved
        for key, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[key] = fn(buffer)
        return self

    torch.nn.Module._apply = _apply


def _weight_files_read_for_real() -> None:
    """Models and weight files are read for real (as CPU tensors) inside the fake mode: ``from_pretrained`` of
    diffusers and transformers models, and safetensors files (a LoRA loaded into a model already on ``cuda``);
    the code under test then moves or copies them where it puts them."""
    import safetensors.torch
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    def for_real(load):
        def real(*args, **kwargs):
            with unset_fake_temporarily():
                return load(*args, **kwargs)

        return real

    safetensors.torch.load_file = for_real(safetensors.torch.load_file)
    for cls in (ModelMixin, PreTrainedModel):
        cls.from_pretrained = classmethod(for_real(cls.from_pretrained.__func__))


def _accelerate_on_fake_cuda() -> None:
    from accelerate import Accelerator

    Accelerator.device = property(lambda self: torch.device("cuda"))

    def backward(self, loss, **kwargs):
        assert loss.device.type == "cuda", f"the loss is on {loss.device}"
        for model in self._models:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def reduce(self, tensor, reduction="sum", scale=1.0):
        if tensor.device.type != self.device.type:
            raise RuntimeError(f"accelerator.reduce of a tensor on {tensor.device}: NCCL reduces CUDA tensors only")
        return tensor

    Accelerator.backward = backward
    Accelerator.reduce = reduce


def main(stage: str) -> None:
    from posebooth import checkpoints, models, outputs, training

    module = importlib.import_module(f"stages.{stage}")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    load_components = models.load_components

    def loading_into_the_fake_mode(ref, device="cpu", precision="fp32", vae="", model_config=""):
        """The stage's own loading, with the fake mode entered first: what the stage computed before it loaded
        the model (images, masks, poses) is real; its models land on fake ``cuda`` by the stage's own code."""
        assert device == "cuda", "the rehearsal needs common.device: cuda in params.yaml"
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
            mode.__enter__()
        return load_components(ref, device, precision, vae, model_config)

    module.load_components = loading_into_the_fake_mode
    _values_read_as_zeros()
    _modules_move_by_new_parameters()
    _weight_files_read_for_real()
    _accelerate_on_fake_cuda()

    def summary(self, **values):
        raise Rehearsed(stage)

    training.StepLog.summary = summary
    checkpoints.save = lambda *args, **kwargs: None  # weights without data cannot be written
    drawn = []  # each draw of training latents from the cached VAE posteriors, counted for the tests
    sample = models.Latents.sample
    models.Latents.sample = lambda self, *args, **kwargs: drawn.append(len(self)) or sample(self, *args, **kwargs)
    sys.argv = [f"stages/{stage}.py"]
    outputs.setup_logging()
    try:
        module.main()
    except Rehearsed:
        pass
    finally:
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            mode.__exit__(None, None, None)
    print(f"rehearsed {stage}; latents drawn {len(drawn)} times ({sum(drawn)} in all)")


if __name__ == "__main__":
    main(sys.argv[1])
