"""FP8 training of the model's linear layers with torchao's float8 recipes (tensorwise, rowwise).

Why: on Hopper (H100/H200, compute capability 9.0) FP8 tensor-core matmuls peak at about twice
bf16's. Each converted linear casts its input, weight and output gradient to FP8 with a dynamic
scale on every step (an amax reduction and a cast: extra reads and writes of those tensors), so
the gain grows with the matmul sizes: at small widths (GPT-2 small's 768) the casts eat most of
it, and torch.compile is needed to fuse them at all.

Where it applies: the transformer blocks' nn.Linear layers (attention projections and MLP) are
swapped for torchao's Float8Linear. GPT-2 holds its projections in transformers' Conv1D (a
transposed linear), so they first become nn.Linear (`linears_from_conv1d`) and go back to Conv1D
before the model is saved (`conv1d_from_linears`).

What stays in bf16/fp32: the output layer (its logits feed the loss and it is often tied to the
embeddings), embeddings, norms, attention's softmax(QK^T)V, the loss, any linear whose widths are
not multiples of 16, the weights themselves (Float8Linear keeps them as plain high-precision
parameters; only the matmul inputs are cast), the optimizer state, checkpoints and the saved model.

Order: convert before the optimizer is built (the GPT-2 swap makes new weight tensors), before a
bf16 working copy, DDP or FSDP wrap the model, and before torch.compile.

Imports only torch; transformers and torchao lazily, so this module imports without torchao.
"""

from __future__ import annotations

import torch

from lmforge.errors import UserError

# The torchao release built against torch 2.11 (the GPU image's torch); 0.18 needs torch >= 2.11 too.
TORCHAO_VERSION = "0.17.0"
# Ada (8.9) and newer have FP8 tensor cores; torch._scaled_mm refuses older GPUs.
MIN_CAPABILITY = (8, 9)
# FP8 matmuls (torch._scaled_mm) need both weight dimensions to be multiples of 16.
FP8_MULTIPLE = 16

# Set on each nn.Linear that replaced a Conv1D, so that only those go back. Matching GPT-2's module
# names (c_attn, c_proj, c_fc, q_attn) would also catch models where such names are plain linears
# from the start (Qwen-1's c_attn/c_proj are nn.Linear) and miss any other Conv1D user. An instance
# attribute survives deepcopy (the bf16 working copy) and wrapping (DDP, FSDP, compile keep the
# module objects); torchao's conversion builds new modules, so to_float8_training carries it over.
WAS_CONV1D = "_lmforge_was_conv1d"


class Float8Error(UserError, RuntimeError):
    """FP8 training cannot run here: the message says what is missing and how to get it."""


def _swap_children(model: torch.nn.Module, swap) -> None:
    """Replace each child for which swap(child) returns a module."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = swap(child)
            if new is not None:
                setattr(module, name, new)


def _parameter(tensor: torch.Tensor, like: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=like.requires_grad)


def _linear_from_conv1d(conv) -> torch.nn.Linear:
    n_in, n_out = conv.weight.shape  # Conv1D stores (in, out): forward is addmm(bias, x, weight)
    with torch.device("meta"):  # no init of weights that are replaced at once
        linear = torch.nn.Linear(n_in, n_out, bias=False)
    linear.weight = _parameter(conv.weight.detach().t().contiguous(), conv.weight)
    linear.bias = conv.bias  # the same parameter: a bias has no layout to change
    setattr(linear, WAS_CONV1D, True)
    return linear


def _conv1d_from_linear(linear: torch.nn.Linear):
    from transformers.pytorch_utils import Conv1D

    weight = linear.weight
    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = _parameter(weight.detach().t().contiguous(), weight)
    # Conv1D always has a bias (addmm needs one); GPT-2's always do, so zeros only guard the odd case.
    conv.bias = linear.bias if linear.bias is not None else torch.nn.Parameter(
        torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))
    return conv


def linears_from_conv1d(model: torch.nn.Module) -> None:
    """Replace every transformers Conv1D by an nn.Linear computing the same function (the weight
    transposed, made contiguous; the bias shared), so torchao can convert it. State-dict names stay
    (c_attn.weight, ...) but those weights' shapes are transposed until conv1d_from_linears."""
    from transformers.pytorch_utils import Conv1D

    _swap_children(model, lambda child: _linear_from_conv1d(child) if type(child) is Conv1D else None)


def conv1d_from_linears(model: torch.nn.Module) -> None:
    """The inverse of linears_from_conv1d: the linears that were Conv1D (plain or converted to
    Float8Linear, whose weight is still a high-precision parameter) become Conv1D again, so
    save_pretrained writes a normal GPT-2 folder. Other linears are left as they are."""
    _swap_children(model, lambda child: _conv1d_from_linear(child)
                   if isinstance(child, torch.nn.Linear) and getattr(child, WAS_CONV1D, False) else None)


def _require_fp8_gpu() -> None:
    if not torch.cuda.is_available():
        raise Float8Error("FP8 training needs a CUDA GPU with compute capability 8.9 or newer "
                          "(Ada, Hopper, Blackwell); no CUDA device is available here")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise Float8Error(f"FP8 training needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper, "
                          f"Blackwell); {torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}")


def _torchao_float8():
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise Float8Error(f"FP8 training needs torchao, which is not installed ({e}): "
                          f"pip install torchao=={TORCHAO_VERSION} (built for torch 2.11)") from e
    return float8


def recipe_config(recipe: str):
    """torchao's Float8LinearConfig for a recipe name (tensorwise, rowwise, ...); Float8Error for others."""
    float8 = _torchao_float8()
    names = [r.value for r in float8.Float8LinearRecipeName]
    if recipe not in names:
        raise Float8Error(f"FP8 recipe {recipe!r} is not one of {', '.join(names)}")
    return float8.Float8LinearConfig.from_recipe_name(recipe)


def _fits_fp8(module: torch.nn.Module) -> bool:
    # The exact class only: subclasses (MultiheadAttention's out_proj, an already converted
    # Float8Linear) are used in ways a swapped forward would not reach, or are done already.
    return (type(module) is torch.nn.Linear
            and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0)


def _gains(recipe: str):
    """torchao's size heuristic for `recipe`: (module, name) -> whether FP8 beats bf16 at its widths
    (from torchao's H100 tables: at GPT-2 small's 768, tensorwise keeps the 768 -> 2304 and 768 -> 3072
    layers, rowwise none). Layers below them ran slower in FP8 (the casts cost more than the matmul
    saves): every block linear of G1's shape converted made its step 8% slower on an H200."""
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=[])


def convert_linears(model: torch.nn.Module, config, where_faster: str | None = None) -> int:
    """Swap the model's nn.Linear layers for torchao's Float8Linear with `config`, except the output
    layer and those whose widths FP8 matmuls cannot take; the number swapped. where_faster: a recipe
    name, to convert only the layers torchao expects to gain with it. GPT-2's Conv1D layers are made
    linears first. No device checks (to_float8_training makes them): on CPU only a config with
    emulate=True runs."""
    float8 = _torchao_float8()
    linears_from_conv1d(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    gains = _gains(where_faster) if where_faster else (lambda _module, _name: True)
    targets = {name for name, m in model.named_modules() if m is not output and _fits_fp8(m) and gains(m, name)}
    was_conv1d = {name for name, m in model.named_modules() if getattr(m, WAS_CONV1D, False)}
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: fqn in targets)
    for name, module in model.named_modules():  # Float8Linear is a new module: keep the mark
        if name in was_conv1d:
            setattr(module, WAS_CONV1D, True)
    return len(targets)


def to_float8_training(model: torch.nn.Module, recipe: str, *, only_where_faster: bool = True) -> int:
    """FP8 matmuls for the model's linear layers with torchao's `recipe` ("tensorwise" or "rowwise");
    the number of layers converted. only_where_faster: only the layers large enough to gain (torchao's
    thresholds; possibly none). Float8Error where there is no FP8-capable CUDA GPU or no torchao.
    Call before building the optimizer and before torch.compile; call plain_linears before saving."""
    _require_fp8_gpu()
    emulate_eager_casts_for(recipe)
    return convert_linears(model, recipe_config(recipe), where_faster=recipe if only_where_faster else None)


def emulate_eager_casts_for(recipe: str) -> None:
    """With the rowwise recipe, have Inductor round its low-precision casts as eager mode does. A
    compiled rowwise step with activation checkpointing could otherwise recompute the scales in the
    backward from values rounded differently from the forward's, and the loss went NaN (PyTorch issue
    150859; torchtitan sets the same flag for rowwise)."""
    if recipe == "rowwise":
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True


def _plain_linear(module: torch.nn.Linear) -> torch.nn.Linear:
    with torch.device("meta"):
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight, linear.bias = module.weight, module.bias  # the same parameters
    return linear


def plain_linears(model: torch.nn.Module) -> None:
    """Undo to_float8_training: GPT-2's layers back to Conv1D, other Float8Linear layers back to
    nn.Linear (with the same parameters), so the model computes in bf16 again and saves as
    transformers wrote it."""
    from torchao.float8.float8_linear import Float8Linear

    conv1d_from_linears(model)
    _swap_children(model, lambda child: _plain_linear(child) if isinstance(child, Float8Linear) else None)
