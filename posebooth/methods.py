"""Stage-1 personalisation methods: what each one trains and what it saves.

- ``lora``: a LoRA on the UNet's attention (DreamBooth-LoRA), optionally a second one on the text encoder
  with its own learning rate. Saves ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``).
  ``train.adapter`` picks the kind (``lora.adapter_config``): lora, dora (the same file), loha or lokr (saved
  as PEFT adapters in ``peft/``, loaded by ``lora.load_adapters``).
- ``full``: the whole UNet, optionally the whole text encoder (DreamBooth as in the paper). Saves a
  diffusers pipeline folder (``StableDiffusionPipeline.from_pretrained``).
- ``custom_diffusion``: only the cross-attention (``attn2``) key and value projections (Kumari et al.
  2023), optionally the identifier's embedding row. Saves ``pytorch_custom_diffusion_weights.safetensors``
  (``pipe.unet.load_attn_procs``, see ``subject.py``) and ``learned_embeds.safetensors``.
- ``textual_inversion``: only the identifier's embedding row; every other row is restored after each
  step, so that weight decay cannot shrink them. Saves ``learned_embeds.safetensors``
  (``pipe.load_textual_inversion``).
- ``momentum_ti``: DreamBooth-LoRA first, then a bounded textual inversion on top of it (a seed
  project): the identifier's embedding is ``e0 + γ(θ − e0)``, ``e0`` its embedding after DreamBooth
  (frozen), ``θ`` trainable and initialised from the class word's. Saves the LoRA and the embedding.

Each method is a list of phases (``momentum_ti`` has two); ``setup`` makes one phase's weights trainable
and returns them as optimizer param groups.

On SDXL (two text encoders) ``lora`` puts its text-encoder LoRA on both encoders (saved as diffusers'
``text_encoder`` and ``text_encoder_2`` LoRAs), and ``textual_inversion`` learns the identifier's row in
both embedding tables, saved as ``clip_l`` and ``clip_g`` (the SDXL convention; see ``subject.load_into``).
``full``, ``custom_diffusion`` and ``momentum_ti`` are SD 1.5 only (``check_supported``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posebooth.lora import add_text_encoder_lora, add_unet_lora

TI_FILE = "learned_embeds.safetensors"
CD_FILE = "pytorch_custom_diffusion_weights.safetensors"


@dataclass
class Trainable:
    """One phase's trainable weights."""

    groups: list[dict]  # optimizer param groups, each with its own "lr"
    named: dict[str, torch.nn.Parameter]  # the same parameters by name, for checkpoints
    text_encoder_trains: bool  # prompts must go through the text encoder at every step
    restore_rows: Callable[[], None] = field(default=lambda: None)  # textual inversion: every other row back
    one_row: set[int] = field(default_factory=set)  # ids of embedding tables of which one row learns
    ema: object = None  # diffusers' EMAModel over ``named`` (train.ema_decay, ``training.make_ema``), or None

    def after_step(self) -> None:
        """After each optimizer step: every other embedding row back (textual inversion), then the EMA's step,
        on the weights as they are used (so its average of those rows stays exactly the original)."""
        self.restore_rows()
        if self.ema is not None:
            self.ema.step(self.named.values())

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]

    @property
    def learned_values(self) -> int:
        """How many numbers learn (an embedding table of which one row learns counts as that row)."""
        return sum(p.shape[-1] if id(p) in self.one_row else p.numel() for p in self.params)


XL_METHODS = ("lora", "textual_inversion")


def check_supported(method: str, xl: bool, model: str) -> None:
    """Stop before training when ``method`` is not available for the base model's architecture."""
    if xl and method not in XL_METHODS:
        raise ValueError(
            f"train.method: {method!r} is not available for the SDXL base {model!r}; choose one of "
            f"{', '.join(XL_METHODS)} (a full SDXL fine-tune needs far more memory than a 16 GB GPU has)"
        )


def phases(method: str) -> list[str]:
    """The phases a method trains in order; ``momentum_ti`` is DreamBooth-LoRA, then the momentum TI."""
    return ["lora", "momentum"] if method == "momentum_ti" else [method]


def phase_steps(phase: str, t) -> int:
    return t.ti_steps if phase == "momentum" else t.steps


def identifier_token(tokenizer, identifier: str) -> int:
    """The identifier's single token id (methods that learn its embedding row need exactly one)."""
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"common.identifier: {identifier!r} is {len(ids)} tokens; the method learns one embedding row: "
            "choose a one-token identifier (e.g. 'sks') or set train.new_token: true"
        )
    return ids[0]


def class_word_embedding(tokenizer, text_encoder, class_noun: str) -> torch.Tensor:
    """The class word's input embedding (D,), the mean of its tokens' rows (``teddy bear`` is two)."""
    ids = tokenizer(class_noun, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight[ids].detach().float().mean(0)


def add_token(tokenizer, text_encoder, identifier: str, class_noun: str) -> int:
    """Add ``identifier`` to the tokenizer as a brand-new token whose embedding starts as the class word's."""
    init = class_word_embedding(tokenizer, text_encoder, class_noun)
    if tokenizer.add_tokens(identifier) != 1:
        raise ValueError(
            f"common.identifier: {identifier!r} is already a token of its own; train.new_token adds a new one"
        )
    text_encoder.resize_token_embeddings(len(tokenizer))
    token = tokenizer.convert_tokens_to_ids(identifier)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token] = init
    return token


def _fp32(params):
    """Trainable weights stay fp32 even when the model runs in half precision."""
    params = list(params)
    for p in params:
        p.data = p.data.float()
    return params


class MomentumEmbedding(torch.nn.Module):
    """The text encoder's token embedding with the identifier's row replaced by ``e0 + γ(θ − e0)``."""

    def __init__(self, base: torch.nn.Embedding, token: int, theta_init: torch.Tensor, gamma: float):
        super().__init__()
        self.base, self.token, self.gamma = base, token, gamma
        self.register_buffer("e0", base.weight[token].detach().float().clone())
        self.theta = torch.nn.Parameter(theta_init.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # what readers of get_input_embeddings().weight expect
        return self.base.weight

    def row(self) -> torch.Tensor:
        return self.e0 + self.gamma * (self.theta - self.e0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        return torch.where((ids == self.token).unsqueeze(-1), self.row().to(out.dtype), out)


def setup(phase: str, comp, t, identifier: str, class_noun: str) -> Trainable:
    """Make ``phase``'s weights of ``comp`` (UNet, text encoder, tokenizer; changed in place) trainable."""
    unet, te, tok = comp.unet, comp.text_encoder, comp.tokenizer
    unet.requires_grad_(False)
    for encoder in comp.text_encoders:
        encoder.requires_grad_(False)
    if phase == "lora":
        groups = [{"params": add_unet_lora(unet, t.rank, t.alpha, t.target_modules, t.adapter), "lr": t.lr}]
        if t.train_text_encoder:  # (both encoders of SDXL)
            lora = [p for i, encoder in enumerate(comp.text_encoders)
                    for p in add_text_encoder_lora(encoder, t.rank, t.alpha, comp.xl and i == 0, t.adapter)]  # fmt: skip
            groups.append({"params": lora, "lr": t.text_encoder_lr})
        return _trainable(comp, groups, t.train_text_encoder)
    if phase == "full":
        unet.requires_grad_(True)
        groups = [{"params": _fp32(unet.parameters()), "lr": t.lr}]
        if t.train_text_encoder:
            if t.new_token:
                add_token(tok, te, identifier, class_noun)
            te.requires_grad_(True)
            groups.append({"params": _fp32(te.parameters()), "lr": t.text_encoder_lr})
        return _trainable(comp, groups, t.train_text_encoder)
    if phase == "custom_diffusion":
        groups = [{"params": _custom_diffusion_processors(unet), "lr": t.lr}]
        if not t.train_token_embedding:
            return _trainable(comp, groups, False)
        token_row = _one_row_trainable(comp, t, identifier, class_noun)
        return _trainable(comp, groups + [{"params": [token_row.param], "lr": t.lr}], True, token_row)
    if phase == "textual_inversion":
        rows = [_one_row_trainable(comp, t, identifier, class_noun, i) for i in range(len(comp.text_encoders))]
        return _trainable(comp, [{"params": [r.param for r in rows], "lr": t.lr}], True, *rows)
    if phase == "momentum":
        # The DreamBooth LoRA of the first phase stays active and frozen.
        token = identifier_token(tok, identifier)
        emb = MomentumEmbedding(te.get_input_embeddings(), token, class_word_embedding(tok, te, class_noun),
                                t.momentum_gamma)  # fmt: skip
        te.set_input_embeddings(emb)
        return _trainable(comp, [{"params": [emb.theta], "lr": t.ti_lr}], True)
    raise ValueError(f"train.method: unknown phase {phase!r}")


def _trainable(comp, groups, text_encoder_trains, *token_rows: _TokenRow) -> Trainable:
    ids = {id(p) for g in groups for p in g["params"]}
    named = {f"unet.{n}": p for n, p in comp.unet.named_parameters() if id(p) in ids}
    for part, encoder in zip(("text_encoder", "text_encoder_2"), comp.text_encoders, strict=False):
        named |= {f"{part}.{n}": p for n, p in encoder.named_parameters() if id(p) in ids}
    if not token_rows:
        return Trainable(groups, named, text_encoder_trains)

    def restore() -> None:
        for row in token_rows:
            row.restore()

    return Trainable(groups, named, text_encoder_trains, restore, {id(r.param) for r in token_rows})


@dataclass
class _TokenRow:
    param: torch.nn.Parameter  # the whole embedding matrix (the gradient reaches the identifier's row only)
    restore: Callable[[], None]  # puts every other row back after an optimizer step


def _one_row_trainable(comp, t, identifier: str, class_noun: str, encoder: int = 0) -> _TokenRow:
    """Textual inversion the way diffusers' script does it: the embedding matrix (of text encoder number
    ``encoder``) is trainable, and every row but the identifier's is copied back after each step (AdamW's
    weight decay would shrink them)."""
    tok, te = comp.tokenizers[encoder], comp.text_encoders[encoder]
    token = add_token(tok, te, identifier, class_noun) if t.new_token else identifier_token(tok, identifier)
    weight = te.get_input_embeddings().weight
    weight.data = weight.data.float()
    weight.requires_grad_(True)
    original = weight.detach().clone()
    keep = torch.ones(len(original), 1, dtype=torch.bool, device=weight.device)  # (V, 1): rows to put back
    keep[token] = False

    def restore() -> None:  # one dense op on the embedding's device (a boolean-mask copy syncs a GPU)
        with torch.no_grad():
            weight.copy_(torch.where(keep, original, weight))

    return _TokenRow(weight, restore)


def _custom_diffusion_processors(unet) -> list[torch.nn.Parameter]:
    """Custom Diffusion attention processors: cross-attention layers get their own K and V projections,
    copied from the originals and trainable; self-attention runs unchanged (diffusers' processors)."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    processors = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            proc = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )  # fmt: skip
            with torch.no_grad():
                proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight.float())
                proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight.float())
            proc.to(attn.to_k.weight.device)
        else:
            proc = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=attn.inner_dim)
        processors[name] = proc
    params = [p for proc in processors.values() for p in proc.parameters()]
    unet.set_attn_processor(processors)  # (empties the dict it is given)
    return params


def identifier_embedding(comp, identifier: str, encoder: int = 0) -> torch.Tensor:
    """The identifier's learned input embedding (1, D) in text encoder number ``encoder``, as
    ``load_textual_inversion`` reads it."""
    emb = comp.text_encoders[encoder].get_input_embeddings()
    if isinstance(emb, MomentumEmbedding):
        return emb.row().detach().float().unsqueeze(0)
    token = identifier_token(comp.tokenizers[encoder], identifier)
    return emb.weight[token].detach().float().unsqueeze(0)


def learned_embeddings(comp, identifier: str) -> dict[str, torch.Tensor]:
    """What ``learned_embeds.safetensors`` holds: ``{identifier: (1, D)}`` for SD 1.5 (diffusers' textual
    inversion format), ``{"clip_l": (1, D1), "clip_g": (1, D2)}`` for SDXL (one row per text encoder)."""
    if comp.xl:
        return {name: identifier_embedding(comp, identifier, i).contiguous() for i, name in enumerate(XL_TI_KEYS)}
    return {identifier: identifier_embedding(comp, identifier).contiguous()}


XL_TI_KEYS = ("clip_l", "clip_g")


def save(method: str, comp, folder: Path, t, identifier: str) -> list[Path]:
    """Write what ``method`` learned into ``folder`` in the formats stock diffusers loads; returns the files."""
    from safetensors.torch import save_file

    from posebooth.lora import save_unet_lora

    files = []
    if method in ("lora", "momentum_ti"):
        te, te2 = (comp.text_encoder, comp.text_encoder_2) if t.train_text_encoder else (None, None)
        files.append(save_unet_lora(comp.unet, folder, te, text_encoder_2=te2, xl=comp.xl))
    if method in ("textual_inversion", "momentum_ti") or (method == "custom_diffusion" and t.train_token_embedding):
        path = folder / TI_FILE
        save_file(learned_embeddings(comp, identifier), str(path), metadata={"token": identifier} if comp.xl else None)
        files.append(path)
    if method == "custom_diffusion":
        state = {k: v.detach().float().contiguous() for k, v in comp.unet.state_dict().items()
                 if "custom_diffusion" in k}  # fmt: skip
        save_file(dict(sorted(state.items())), str(folder / CD_FILE))
        files.append(folder / CD_FILE)
    if method == "full":
        from posebooth.models import sd_pipeline

        pipe = sd_pipeline(comp, "ddpm")
        # the base model's own sampling scheduler (SD 1.5: PNDM), as train_dreambooth.py keeps it, so that
        # from_pretrained(models/stage1) samples as the base did, not with 1000-step DDPM
        pipe.register_modules(scheduler=comp.base_scheduler)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        files.append(folder / "model_index.json")
    return files
