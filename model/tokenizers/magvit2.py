"""MAGVIT-v2 image tokenizer: the 8,192-code, 16x-downsampling image tokenizer of Show-o, MMaDA and the reference
Omni-Diffusion, written to load the public `showlab/magvitv2` checkpoint (`pytorch_model.safetensors`).

    uint8 (B, H, W, 3) --[-1, 1]--> Encoder --(B, 13, H/16, W/16)--> LFQ: sign bits -> code in [0, 8192)
    code --> ±1 bits --> Decoder --> [-1, 1] --> uint8

Facts taken from the public model code (showlab/Show-o models/modeling_magvitv2.py + models/common_modules.py;
the copies in Gen-Verse/MMaDA and VITA-MLLM/Omni-Diffusion omni_diffusion/models/magvit/ are the same): the
published model is `MAGVITv2()` built with its constructor defaults (the hub config.json carries no
hyperparameters), i.e. a taming-style VQGAN encoder (ch 128, ch_mult 1,2,2,4,4, res blocks 4,3,4,3,4), decoder
(ch 128, ch_mult 1,1,2,2,4, res blocks 4,4,3,4,3), GroupNorm(32, eps 1e-6), swish, one single-head attention
block in each middle, and a look-up-free quantizer over z_channels = 13 bits. Its `attn_resolutions=[5]` never
equals a feature-map side at 256 px, so the public model has no attention inside the levels and none is built
here. The state_dict keys (module attribute names) follow that code so the checkpoint loads strictly.

Preprocessing (the reference `image_transform` in Show-o / MMaDA / Omni-Diffusion): resize the shorter side to
`size` with bicubic filtering (PIL), center-crop `size x size`, scale to [-1, 1] (ToTensor + Normalize(0.5, 0.5)).
Decoding maps back with clamp((x + 1) / 2, 0, 1) * 255 truncated to uint8, as the reference sampling scripts do.
The reference encodes 256x256 for generation targets (256 tokens) and 512x512 for understanding inputs
(1,024 tokens): `size` picks one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import storage
from common.configlib import ConfigError, to_dict
from model.tokenizers.base import BadInput

# A larger safetensors JSON header means the file is something else that happens to start like one.
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
PUBLIC_CHECKPOINT_HINT = (
    "download pytorch_model.safetensors from https://huggingface.co/showlab/magvitv2 once, copy it to a local "
    "path or s3:// URI, and set image.weights to it"
)


# ----------------------------------------------------------------------------------------------------------------
# Architecture config
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Magvit2Config:
    """MAGVIT-v2 shape. Defaults are the published model's (see the module docstring for the source)."""

    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    z_channels: int = 13          # LFQ bits per token: codebook_size = 2 ** z_channels
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        levels = len(self.encoder_ch_mult)
        if len(self.decoder_ch_mult) != levels:
            raise ConfigError(f"magvit2: encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult "
                              f"{self.decoder_ch_mult} must have the same number of levels")
        for name in ("encoder", "decoder"):
            mult, blocks = getattr(self, f"{name}_ch_mult"), getattr(self, f"{name}_num_res_blocks")
            if len(blocks) != len(mult):
                raise ConfigError(f"magvit2: {name}_num_res_blocks {blocks} needs one entry per level of "
                                  f"{name}_ch_mult {mult}")
            bad = [self.ch * m for m in mult if (self.ch * m) % self.norm_groups]
            if bad:
                raise ConfigError(f"magvit2: {name} channel counts {bad} are not divisible by "
                                  f"norm_groups={self.norm_groups}")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.z_channels

    @property
    def downsample(self) -> int:
        """Pixels per token side: one stride-2 conv between consecutive levels."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def preset(cls, name: str) -> "Magvit2Config":
        try:
            return dataclasses.replace(_PRESETS[name])
        except KeyError:
            raise ConfigError(f"unknown magvit2 preset {name!r} (image.magvit2_preset); presets: "
                              f"{sorted(_PRESETS)}") from None


_PRESETS: dict[str, Magvit2Config] = {
    # showlab/magvitv2 as published: ~95M parameters.
    "public": Magvit2Config(),
    # Tests and CPU demos: same layout (5 levels = 16x, 13-bit LFQ = 8,192 codes, a channel change so the 1x1
    # shortcut convs exist), ~0.27M parameters.
    "tiny": Magvit2Config(ch=16, encoder_ch_mult=(1, 1, 2, 2, 2), encoder_num_res_blocks=(1, 1, 1, 1, 1),
                          decoder_ch_mult=(1, 1, 2, 2, 2), decoder_num_res_blocks=(1, 1, 1, 1, 1),
                          norm_groups=8),
}


# ----------------------------------------------------------------------------------------------------------------
# Network (attribute names = checkpoint key names)
# ----------------------------------------------------------------------------------------------------------------

def _norm(channels: int, cfg: Magvit2Config) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


class ResnetBlock(nn.Module):
    """Pre-norm residual block; a 1x1 `nin_shortcut` only where the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, cfg: Magvit2Config):
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, cfg)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0.0 in the published model
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, ch: int, cfg: Magvit2Config):
        super().__init__()
        self.norm = _norm(ch, cfg)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, 1, C, H * W).transpose(2, 3)  # (B, 1, HW, C)

        # softmax(q k^T / sqrt(C)) v, the reference's scale
        out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad right/bottom only: the reference's asymmetric padding, so weights line up pixel for pixel
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Middle(nn.Module):
    def __init__(self, ch: int, cfg: Magvit2Config):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, cfg)
        self.attn_1 = AttnBlock(ch, cfg)
        self.block_2 = ResnetBlock(ch, ch, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """Residual blocks at one resolution, then an optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, cfg: Magvit2Config,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n_blocks))
        if downsample:
            self.downsample = Downsample(out_ch)
        if upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """[-1, 1] pixels (B, 3, H, W) -> pre-quantization latents (B, z_channels, H/16, W/16)."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.encoder_ch_mult]
        n = len(chans)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else chans[i - 1], chans[i], cfg.encoder_num_res_blocks[i], cfg,
                  downsample=i < n - 1)
            for i in range(n))
        self.mid = Middle(chans[-1], cfg)
        self.norm_out = _norm(chans[-1], cfg)
        self.conv_out = nn.Conv2d(chans[-1], cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    """±1 bit maps (B, z_channels, h, w) -> [-1, 1]-ish pixels (B, 3, 16h, 16w)."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.decoder_ch_mult]
        n = len(chans)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = Middle(chans[-1], cfg)
        # up[i] runs at level i; levels run from the coarsest (n-1) to the finest (0), so level i takes the
        # channels of level i+1 and every level but 0 ends with a 2x upsample.
        self.up = nn.ModuleList(
            Level(chans[min(i + 1, n - 1)], chans[i], cfg.decoder_num_res_blocks[i], cfg, upsample=i > 0)
            for i in range(n))
        self.norm_out = _norm(chans[0], cfg)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Look-up-free quantization: each latent channel is one bit (> 0 -> 1), the code is the bits read
    most-significant first (channel 0 = bit z_channels-1). The two buffers are in the public checkpoint; they are
    fixed functions of z_channels and checked after loading."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("embedding", _code_bits_table(bits))   # (2**bits, bits) ±1.0
        self.register_buffer("power_vals", _powers(bits))            # (bits,) int64, 2**(bits-1) ... 1

    def latents_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, bits, h, w) float -> (B, h, w) int64."""
        return ((z > 0).long() * self.power_vals.view(1, -1, 1, 1)).sum(1)

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes (...) -> ±1.0 bits (..., bits), computed from the code (no table look-up)."""
        on = (codes.long().unsqueeze(-1) // self.power_vals) % 2  # (..., bits)
        return on.float() * 2 - 1

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """±1 bits (..., bits) -> int64 codes (...)."""
        return ((bits > 0).long() * self.power_vals).sum(-1)


def _powers(bits: int) -> torch.Tensor:
    return 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long)


def _code_bits_table(bits: int) -> torch.Tensor:
    on = (torch.arange(2 ** bits).unsqueeze(1) // _powers(bits)) % 2  # (2**bits, bits)
    return on.float() * 2 - 1


class Magvit2(nn.Module):
    """encoder + quantize + decoder, with the published module names at the top level."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = LFQuantizer(cfg.z_channels)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] float (B, 3, H, W) -> int64 codes (B, H/16 * W/16), row-major over the token grid."""
        codes = self.quantize.latents_to_codes(self.encoder(x))  # (B, h, w)
        return codes.reshape(codes.shape[0], -1)  # (B, h*w)

    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """int codes (B, h*w) -> float pixels (B, 3, 16h, 16w), nominally in [-1, 1]."""
        h, w = grid
        bits = self.quantize.codes_to_bits(codes.reshape(codes.shape[0], h, w))  # (B, h, w, bits)
        return self.decoder(bits.permute(0, 3, 1, 2).contiguous())  # decoder takes (B, bits, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

class WeightsError(ValueError):
    """A MAGVIT-v2 weights file is unreadable, unsafe or does not fit the architecture; the message says which."""


def _is_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON header
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= min(len(data) - 8, _SAFETENSORS_MAX_HEADER) and data[8:9] == b"{"


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor mapping from a local path or s3:// URI: safetensors (recognised by content), or
    a PyTorch file read with torch.load(weights_only=True), so a pickle cannot run code."""
    data = storage.read_bytes(uri)
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors
        try:
            return dict(load_safetensors(data))
        except Exception as e:
            raise WeightsError(f"{uri}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{uri}: refused or unreadable as a PyTorch weights file (read with weights_only=True: only tensors "
            f"and plain containers are accepted, never arbitrary pickled objects): {e}. Use the safetensors "
            f"checkpoint instead: {PUBLIC_CHECKPOINT_HINT}") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise WeightsError(f"{uri}: expected a flat mapping of parameter names to tensors (a state_dict), got "
                           f"{type(obj).__name__}" + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else ""))
    return obj


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, preset: str) -> None:
    """Strict key and shape check with a message that lists what is missing, unexpected or mis-shaped."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or mis_shaped):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")

    parts = [f"{len(missing)} missing key(s): {show(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {show(unexpected)}" if unexpected else "",
             f"{len(mis_shaped)} shape mismatch(es): {show(mis_shaped)}" if mis_shaped else ""]
    raise WeightsError(
        f"MAGVIT-v2 weights {source} do not fit the {preset!r} architecture: " + "; ".join(p for p in parts if p)
        + f". Check image.magvit2_preset and that image.weights is showlab/magvitv2's checkpoint "
          f"({PUBLIC_CHECKPOINT_HINT}).")


def load_weights(model: Magvit2, uri: str, preset: str) -> None:
    state = read_state_dict(uri)
    check_state_dict(model, state, uri, preset)
    model.load_state_dict(state, strict=True)
    # the quantizer tables are not learned: a file whose copies differ was not made by this architecture
    q = model.quantize
    if not (torch.equal(q.embedding, _code_bits_table(q.bits)) and torch.equal(q.power_vals, _powers(q.bits))):
        raise WeightsError(f"{uri}: quantize.embedding / quantize.power_vals are not the {q.bits}-bit LFQ tables "
                           f"(bit order most-significant first); this is not a MAGVIT-v2 LFQ checkpoint")


def build_model(arch: Magvit2Config, weights: str = "", *, preset: str = "custom", seed: int = 0) -> Magvit2:
    """The network on CPU in eval mode: loaded from `weights`, or randomly initialised from `seed` (the same
    weights in every process, so tokenize actors agree on codes)."""
    if weights:
        with torch.device("meta"):
            model = Magvit2(arch)
        model = model.to_empty(device="cpu")
        load_weights(model, weights, preset)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Magvit2(arch)
    return model.eval().requires_grad_(False)


def state_digest(model: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of the state_dict (CPU tensors), in key order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy of 382 MB
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The ImageTokenizer
# ----------------------------------------------------------------------------------------------------------------

def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """Reference preprocessing up to the value range: shorter side -> `size` (bicubic), center crop -> uint8
    (size, size, 3). The same size arithmetic as torchvision's Resize(int) and CenterCrop."""
    img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).copy()  # (size, size, 3)


class Magvit2Tokenizer:
    """ImageTokenizer over MAGVIT-v2: square `size` images, (size/16)^2 codes in [0, 8192) each."""

    name = "magvit2"

    def __init__(self, model: Magvit2, *, size: int, preset: str, max_pixels: int = 50_000_000,
                 device: str | torch.device | None = None, max_batch: int = 8, weights: str = ""):
        arch = model.config
        if size <= 0 or size % arch.downsample:
            raise ConfigError(f"image.size={size} must be a positive multiple of {arch.downsample} for MAGVIT-v2 "
                              f"(the reference uses 256 for generation targets and 512 for understanding inputs)")
        self.arch = arch
        self.preset = preset
        self.size = size
        self.max_pixels = max_pixels
        self.max_batch = max_batch
        self.weights = weights
        self.codebook_size = arch.codebook_size
        self.grid = (size // arch.downsample, size // arch.downsample)
        self._weights_digest = state_digest(model)  # before moving: hashing reads CPU memory
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def load(self, data: bytes, source: str = "") -> np.ndarray:
        where = source or "image"
        if not data:
            raise BadInput("empty_file", f"{where} is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                # PIL warns from 89M pixels; image.max_pixels is the limit that applies here
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
            with img:
                # size comes from the header; refuse before any pixel is decoded
                w, h = img.size
                if w * h > self.max_pixels:
                    raise BadInput("image_too_large", f"{where} is {w}x{h} = {w * h:,} pixels, over "
                                                      f"image.max_pixels={self.max_pixels:,}")
                img.load()
                return preprocess(img, self.size)
        except BadInput:
            raise
        except Image.DecompressionBombError as e:
            raise BadInput("image_too_large", f"{where}: {e}") from e
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise BadInput("corrupt_image", f"{where} could not be decoded: {type(e).__name__}: {e}") from e

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        want = (self.size, self.size, 3)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise ValueError(f"magvit2 encode expects uint8 (B, {self.size}, {self.size}, 3) images (from load()), "
                             f"got {images.dtype} {images.shape}")
        out = []
        for start in range(0, len(images), self.max_batch):
            x = torch.from_numpy(images[start:start + self.max_batch]).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            out.append(self.model.encode_pixels(x).cpu())
        if not out:
            return np.zeros((0, self.tokens_per_image), dtype=np.int64)
        return torch.cat(out).numpy().astype(np.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"magvit2 decode expects integer codes (B, {self.tokens_per_image}), got "
                             f"{codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"magvit2 codes outside [0, {self.codebook_size}): min {codes.min()}, "
                             f"max {codes.max()}")
        out = []
        for start in range(0, len(codes), self.max_batch):
            c = torch.from_numpy(codes[start:start + self.max_batch].astype(np.int64)).to(self.device)
            x = self.model.decode_codes(c, self.grid)  # (B, 3, H, W)
            # the reference's uint8 conversion: clamp to [0, 1], scale, truncate
            x = ((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0
            out.append(x.permute(0, 2, 3, 1).to(torch.uint8).cpu())  # (B, H, W, 3)
        if not out:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return torch.cat(out).numpy()

    def fingerprint(self) -> str:
        desc = {"name": self.name, "arch": to_dict(self.arch), "size": self.size,
                "preprocess": "short-side-bicubic+center-crop,[-1,1]", "weights_sha256": self._weights_digest}
        return "magvit2-" + hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _cfg_field(cfg: Any, name: str) -> Any:
    if not hasattr(cfg, name):
        raise ConfigError(f"image tokenizer config {type(cfg).__name__} has no field {name!r} (needed by magvit2)")
    return getattr(cfg, name)


def build_magvit2(cfg: Any, *, device: str | torch.device | None = None) -> Magvit2Tokenizer:
    """ImageTokenizerConfig (size, magvit2_preset, weights, random_init, max_pixels) -> tokenizer on CUDA when
    available, else CPU. `channels` and `levels` belong to the pixel tokenizer and are ignored: MAGVIT-v2 is RGB."""
    preset = _cfg_field(cfg, "magvit2_preset")
    weights = _cfg_field(cfg, "weights")
    random_init = _cfg_field(cfg, "random_init")
    arch = Magvit2Config.preset(preset)
    if weights and random_init:
        raise ConfigError(f"image.weights={weights!r} and image.random_init=true are both set: choose one")
    if not weights and not random_init:
        raise ConfigError(f"image.kind=magvit2 needs weights: {PUBLIC_CHECKPOINT_HINT} (e.g. "
                          f"image.weights=s3://bucket/magvitv2/pytorch_model.safetensors); image.magvit2_preset="
                          f"{preset!r}. Tests may set image.random_init=true instead.")
    model = build_model(arch, weights, preset=preset)
    return Magvit2Tokenizer(model, size=_cfg_field(cfg, "size"), preset=preset,
                            max_pixels=_cfg_field(cfg, "max_pixels"), device=device, weights=weights)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark helper: encode images/s at 256x256, batch 1 and 16 (`omnidiff bench`)
# ----------------------------------------------------------------------------------------------------------------

def bench_encode(size: int = 256, batch_sizes: tuple[int, ...] = (1, 16), preset: str = "public",
                 repeats: int = 3, device: str = "cpu", seed: int = 0) -> dict[int, float]:
    """Encode throughput in images/s per batch size, on random weights (speed does not depend on their values)
    and random uint8 images; one warm-up call per batch size, then `repeats` timed calls."""
    model = build_model(Magvit2Config.preset(preset), preset=preset, seed=seed)
    tok = Magvit2Tokenizer(model, size=size, preset=preset, device=device, max_batch=max(batch_sizes))
    rng = np.random.default_rng(seed)
    result = {}
    for bs in batch_sizes:
        images = rng.integers(0, 256, size=(bs, size, size, 3), dtype=np.uint8)
        tok.encode(images)  # warm-up: allocator, kernels
        if tok.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            tok.encode(images)  # encode returns numpy, so each call has finished on the device
        result[bs] = bs * repeats / (time.perf_counter() - start)
    return result


__all__ = ["Magvit2Config", "Magvit2", "Magvit2Tokenizer", "LFQuantizer", "WeightsError", "build_magvit2",
           "build_model", "bench_encode", "preprocess", "read_state_dict", "check_state_dict"]
