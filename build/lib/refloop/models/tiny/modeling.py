"""refloop-tiny: a small VLM that learns grounding on a 2-core CPU.

Design (measured in shared/notes/tiny-model-experiments.md and here):
- A ViT trained from scratch did not bind positions on this budget; a conv encoder whose every
  stage sees x/y coordinate channels does.
- REG reads a *region token*: features sampled inside the box given by the four coordinate
  tokens just before it, so the describer looks at the object it is asked about.
- REC first emits a *pointer token* <cell_k> naming the grid cell of the target's centre. Its
  logit is a content match between the decoder state and that cell's features, so choosing the
  object is a comparison, not a lookup table; the box tokens then follow.
Sequence layout: [image tokens x grid^2] [prompt] [answer]; image tokens attend only to each
other (bidirectionally), everything else is causal. Image tokens therefore have the same states for
every query on an image, which training exploits (`forward_shared_images`): several queries per
scene pay for the image tokens once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from refloop.models.tiny.configuration import RefloopTinyConfig

# The cache's name in model outputs and forward kwargs: `cache` from transformers 5.24 on, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _coord_channels(x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


def _detach_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x` with the rows (first dimension) marked in `rows` cut from the autograd graph."""
    return torch.where(rows.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.detach(), x)


class CoordConvStage(nn.Module):
    """Stride-2 conv then a residual 3x3 conv; both see the coordinate channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in + 2, c_out, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv = nn.Conv2d(c_out + 2, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.down(_coord_channels(x))))
        return x + F.gelu(self.norm2(self.conv(_coord_channels(x))))


class VisionEncoder(nn.Module):
    def __init__(self, config: RefloopTinyConfig) -> None:
        super().__init__()
        chans = [3, *config.vision_channels]
        self.stages = nn.ModuleList(CoordConvStage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.proj = nn.Linear(chans[-1], config.hidden_size)
        self.grid_pos = nn.Parameter(torch.randn(config.num_cells, config.hidden_size) * config.initializer_range)
        # Region features come from the two finest-but-one stages (28x28 and 14x14 at 112 px).
        self.region_proj = nn.Linear(chans[-3] + chans[-2], config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = []
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        grid = self.proj(x.flatten(2).transpose(1, 2)) + self.grid_pos
        return grid, maps[-3:-1]

    def region_features(self, maps: list[torch.Tensor], boxes: torch.Tensor, samples: int = 4) -> torch.Tensor:
        """Mean of features bilinearly sampled on a samples x samples lattice inside each box.

        maps: per-image feature maps (already gathered so row i belongs to box i); boxes: (N, 4)
        normalised xyxy in [0, 1].
        """
        steps = (torch.arange(samples, device=boxes.device, dtype=boxes.dtype) + 0.5) / samples
        xs = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * steps  # (N, S)
        ys = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * steps
        grid = torch.stack(
            [xs[:, None, :].expand(-1, samples, -1), ys[:, :, None].expand(-1, -1, samples)], dim=-1
        )  # (N, S, S, 2) in [0, 1]
        grid = grid * 2 - 1
        # the lattice in the maps' dtype: boxes arrive in fp32 from the processor, maps in the model's (bf16 / fp16)
        pooled = [F.grid_sample(m, grid.to(m.dtype), align_corners=False).mean(dim=(2, 3)) for m in maps]
        return self.region_proj(torch.cat(pooled, dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, config: RefloopTinyConfig, layer_idx: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        return tuple(p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class MLP(nn.Module):
    def __init__(self, config: RefloopTinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: RefloopTinyConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RefloopTinyPreTrainedModel(PreTrainedModel):
    config_class = RefloopTinyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)


class RefloopTinyForConditionalGeneration(RefloopTinyPreTrainedModel, GenerationMixin):
    def __init__(self, config: RefloopTinyConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.vision = VisionEncoder(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, h)
        self.cell_in = nn.Linear(h, h, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.pointer_query = nn.Linear(h, h, bias=False)
        self.pointer_key = nn.Linear(h, h, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ---- pieces -------------------------------------------------------------------------
    def _cell_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids - self.config.cell_token_start

    def _region_boxes(self, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Read the four coordinate tokens preceding each region token ('{ x1 y1 x2 y2 } <region>')."""
        cfg = self.config
        offsets = torch.arange(-5, -1, device=input_ids.device)
        idx = (cols[:, None] + offsets).clamp(min=0)
        coords = input_ids[rows[:, None], idx] - cfg.coord_token_start
        valid = ((coords >= 0) & (coords < cfg.num_coord_bins)).all(dim=1, keepdim=True)
        boxes = coords.clamp(0, cfg.num_coord_bins - 1).float() / (cfg.num_coord_bins - 1)
        return torch.where(valid, boxes, torch.zeros_like(boxes)), valid

    def _embed(
        self,
        input_ids: torch.Tensor,
        grid: torch.Tensor,
        region_maps: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Token embeddings; image features replace the image tokens of a prompt (prefill only)."""
        cfg = self.config
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_id
        if region_maps is not None and is_image.any():
            counts = is_image.sum(dim=1)
            if not bool((counts == cfg.num_cells).all()):
                raise ValueError(f"every row needs exactly {cfg.num_cells} image tokens, got {counts.tolist()}")
            embeds = embeds.masked_scatter(is_image[..., None], grid.to(embeds.dtype))
        cells = self._cell_ids(input_ids)
        is_cell = (cells >= 0) & (cells < cfg.num_cells)
        if is_cell.any():
            picked = torch.gather(grid, 1, cells.clamp(0, cfg.num_cells - 1)[..., None].expand(-1, -1, grid.shape[-1]))
            embeds = embeds + self.cell_in(picked) * is_cell[..., None]
        is_region = input_ids == cfg.region_token_id
        if region_maps is not None and is_region.any():
            rows, cols = is_region.nonzero(as_tuple=True)
            boxes, valid = self._region_boxes(input_ids, rows, cols)
            feats = self.vision.region_features([m[rows] for m in region_maps], boxes) * valid
            embeds = embeds.index_put((rows, cols), embeds[rows, cols] + feats.to(embeds.dtype))
        return embeds

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor, q_len: int, past_len: int, is_image: torch.Tensor | None) -> torch.Tensor:
        """Boolean (B, 1, Q, K) mask: causal + padding, image prefix bidirectional, self always visible."""
        k_len = attention_mask.shape[1]
        q_pos = torch.arange(past_len, past_len + q_len, device=attention_mask.device)
        k_pos = torch.arange(k_len, device=attention_mask.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask.bool()[:, None, :]
        if is_image is not None and past_len == 0:
            mask = mask | (is_image[:, :, None] & is_image[:, None, :])
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
        return mask[:, None]

    def _logits(self, x: torch.Tensor, grid: torch.Tensor, pointer_keys: torch.Tensor | None = None) -> torch.Tensor:
        """`pointer_keys`: `pointer_key(grid)` if already computed (a decode step reuses the first step's)."""
        h = self.norm(x)
        logits = self.lm_head(h)
        # Pointer logits: content match between the decoder state and each grid cell.
        start, n = self.config.cell_token_start, self.config.num_cells
        keys = self.pointer_key(grid) if pointer_keys is None else pointer_keys
        pointer = self.pointer_query(h) @ keys.transpose(1, 2) / math.sqrt(h.shape[-1])
        return torch.cat([logits[..., :start], pointer.to(logits.dtype), logits[..., start + n :]], dim=-1)

    def forward_shared_images(
        self,
        pixel_values: torch.Tensor,
        image_index: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        frozen_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of text that follows the image tokens, image-token states computed once per image.

        Equals `forward` on '<image> x grid^2 + input_ids' (right-padded text); tested.
        `frozen_images` ([num_images] bool): those images' encodings are detached, so their rows
        train the decoder but send no gradient into the vision encoder.
        """
        _, txt, txt_grid = self._shared_image_layers(pixel_values, image_index, input_ids, attention_mask, frozen_images=frozen_images)
        return self._logits(txt, txt_grid)

    def _shared_image_layers(
        self,
        pixel_values: torch.Tensor,
        image_index: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        keep=None,
        frozen_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder over right-padded text rows that follow the image tokens, the image tokens'
        states computed once per distinct image: (image states, text states, each row's grid)
        after the last layer. `keep(layer_idx, keys, values)` receives every layer's keys and
        values of the rows ([image tokens, text])."""
        n_img = self.config.num_cells
        grid, maps = self.encode_images(pixel_values)
        if frozen_images is not None and bool(frozen_images.any()):
            grid, maps = _detach_rows(grid, frozen_images), [_detach_rows(m, frozen_images) for m in maps]
        img = grid + self.embed_positions(torch.arange(n_img, device=grid.device))
        pos = n_img + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        txt_grid = grid[image_index]
        txt = self._embed(input_ids, txt_grid, [m[image_index] for m in maps])
        txt = txt + self.embed_positions(pos.clamp(max=self.config.max_position_embeddings - 1))
        t = input_ids.shape[1]
        text_mask = self._attention_mask(attention_mask, t, 0, None)
        mask = torch.cat([text_mask.new_ones(text_mask.shape[0], 1, t, n_img), text_mask], dim=-1)
        for layer in self.layers:
            attn = layer.self_attn
            qi, ki, vi = attn.qkv(layer.input_layernorm(img))
            qt, kt, vt = attn.qkv(layer.input_layernorm(txt))
            img_out = attn.out(F.scaled_dot_product_attention(qi, ki, vi))
            keys = torch.cat([ki[image_index], kt], dim=2)
            values = torch.cat([vi[image_index], vt], dim=2)
            if keep is not None:
                keep(attn.layer_idx, keys, values)
            txt_out = attn.out(F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask))
            img = img + img_out
            img = img + layer.mlp(layer.post_attention_layernorm(img))
            txt = txt + txt_out
            txt = txt + layer.mlp(layer.post_attention_layernorm(txt))
        return img, txt, txt_grid

    def _image_prefix_text(self, input_ids: torch.LongTensor, mask: torch.Tensor) -> tuple | None:
        """Left-padded rows that start with the image tokens, split: (first real position of each
        row, its text length, the text after the image tokens right-padded, its mask); None when
        a row does not start with the image tokens."""
        n_img = self.config.num_cells
        start = mask.long().argmax(dim=1)  # first real token of each row (left padding)
        cols = start[:, None] + torch.arange(n_img, device=input_ids.device)
        if int(cols.max()) >= input_ids.shape[1] or not bool((input_ids.gather(1, cols) == self.config.image_token_id).all()):
            return None
        length = input_ids.shape[1] - start - n_img
        width = int(length.max())
        pos = torch.arange(width, device=input_ids.device)
        src = (start + n_img)[:, None] + pos
        valid = pos[None, :] < length[:, None]
        src = src.clamp(max=input_ids.shape[1] - 1)
        text = torch.where(valid, input_ids.gather(1, src), self.config.pad_token_id or 0)
        text_mask = torch.where(valid, mask.gather(1, src), 0)
        return start, length, text, text_mask

    def _shared_image_forward(
        self,
        pixel_values: torch.Tensor,
        image_index: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor | None:
        """A whole-sequence forward (log-probs, training) whose rows share images: the image
        tokens' states depend on the image only (they attend to each other, never to text), so
        they are computed once per distinct image by `forward_shared_images` and every row runs
        only its text. Rows are left-padded prompts that start with the image tokens; returns
        the logits `forward` returns (same positions), or None when the layout differs or no
        image is shared (then the plain path runs)."""
        n_img, b = self.config.num_cells, input_ids.shape[0]
        if pixel_values.shape[0] >= b or logits_to_keep <= 0:
            return None
        split = self._image_prefix_text(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        if split is None:
            return None
        start, _, text, text_mask = split
        logits = self.forward_shared_images(pixel_values, image_index, text, text_mask)
        # Back to the original layout: its last `logits_to_keep` positions, which are text.
        orig = torch.arange(input_ids.shape[1] - logits_to_keep, input_ids.shape[1], device=input_ids.device)
        at = orig[None, :] - (start + n_img)[:, None]
        if bool((at < 0).any()):
            return None
        return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))

    def _shared_image_prefill(
        self,
        pixel_values: torch.Tensor,
        image_index: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        logits_to_keep: int = 0,
    ) -> torch.Tensor | None:
        """A generate() prefill whose rows share images (the locator's queries on one image, the
        describer's boxes of one image): the image tokens attend only to each other, so their keys
        and values depend on the image alone and a prefix cache of them is valid for any text
        that follows. They are computed once per distinct image, every row runs only its text
        (`_shared_image_layers`), and `cache` is filled in each row's own left-padded layout, so
        the decode steps are the plain ones. Returns the logits `forward` returns (the last
        `logits_to_keep` positions, 0: all; a padding position's mean nothing), or None when the
        layout differs (then the plain prefill runs). Equal to the plain prefill up to float
        rounding (~1e-6), not bit for bit, hence opt-in (`share_image_states`)."""
        total = input_ids.shape[1]
        split = self._image_prefix_text(input_ids, attention_mask)
        if split is None or self.config.num_cells + split[2].shape[1] != total or int(split[1].min()) < 1:
            return None
        start, _, text, text_mask = split
        # Row b's cache position p holds [image tokens, text] position (p - start_b) mod total:
        # its left padding takes the right-padded text's tail, which the attention mask hides.
        layout = (torch.arange(total, device=input_ids.device)[None, :] - start[:, None]) % total

        def keep(layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            at = layout[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
            cache.update(keys.gather(2, at), values.gather(2, at), layer_idx)

        img, txt, txt_grid = self._shared_image_layers(pixel_values, image_index, text, text_mask, keep)
        cache.refloop_grid, cache.refloop_pointer_keys = txt_grid, None
        states = torch.cat([img[image_index], txt], dim=1)
        states = states.gather(1, layout[:, -logits_to_keep:, None].expand(-1, -1, states.shape[-1]))  # -0: every position
        return self._logits(states, txt_grid)

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.vision(pixel_values.to(self.dtype))

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        share_image_states: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`image_index[i]` names the pixel_values row of sequence i, so several queries can share
        one encoded image (training runs several queries per rendered scene). `logits_to_keep > 0`
        computes logits for the last that many positions only (0: all), as transformers' models do:
        log-probs of an answer need no vocabulary logits over the image and prompt.
        `share_image_states`: rows that share an image reuse its image tokens' states, in
        whole-sequence forwards (log-probs, training: `_shared_image_forward`) and in generate()'s
        prefill (`_shared_image_prefill`); equal to the plain forward up to float rounding (~1e-6),
        not bit for bit, hence opt-in."""
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 names it `cache`
        if share_image_states and pixel_values is not None and image_index is not None and past_key_values is None and not use_cache:
            shared = self._shared_image_forward(pixel_values, image_index, input_ids, attention_mask, logits_to_keep)
            if shared is not None:
                return CausalLMOutputWithPast(logits=shared)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if (
            share_image_states
            and use_cache
            and past_len == 0
            and pixel_values is not None
            and image_index is not None
            and pixel_values.shape[0] < input_ids.shape[0]
        ):
            cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            logits = self._shared_image_prefill(pixel_values, image_index, input_ids, mask, cache, logits_to_keep)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if pixel_values is not None:
            grid, region_maps = self.encode_images(pixel_values)
            if image_index is not None:
                grid, region_maps = grid[image_index], [m[image_index] for m in region_maps]
            if past_key_values is not None:
                past_key_values.refloop_grid, past_key_values.refloop_pointer_keys = grid, None
        elif past_key_values is not None and hasattr(past_key_values, "refloop_grid"):
            grid, region_maps = past_key_values.refloop_grid, None
            if grid.shape[0] != input_ids.shape[0]:
                # A prompt prefilled once for its K samples: the cache was repeated K times after the prefill.
                grid = past_key_values.refloop_grid = grid.repeat_interleave(input_ids.shape[0] // grid.shape[0], dim=0)
        else:
            raise ValueError("refloop-tiny needs pixel_values on the first forward pass")

        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        position_ids = position_ids.clamp(max=self.config.max_position_embeddings - 1)
        x = self._embed(input_ids, grid, region_maps) + self.embed_positions(position_ids)
        is_image = input_ids == self.config.image_token_id
        mask = self._attention_mask(attention_mask, input_ids.shape[1], past_len, is_image)
        cache = past_key_values if use_cache or past_len else None
        for layer in self.layers:
            x = layer(x, mask, cache)
        pointer_keys = None
        if past_len and region_maps is None:
            # Decode steps: the grid is the cache's, so are its pointer keys (computed at the first step).
            pointer_keys = getattr(past_key_values, "refloop_pointer_keys", None)
            if pointer_keys is None or pointer_keys.shape[0] != grid.shape[0]:
                pointer_keys = past_key_values.refloop_pointer_keys = self.pointer_key(grid)
        logits = self._logits(x[:, -logits_to_keep:], grid, pointer_keys)  # -0: every position

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values if use_cache else None})

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """K samples per prompt (`num_return_sequences`) reuse the prompt's encoded image: with
        `image_index` only the index is repeated, never the pixels."""
        pixel_values = model_kwargs.pop("pixel_values", None) if model_kwargs.get("image_index") is not None else None
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> dict:
        """After the first step only the new token is fed and the image stays in the cache.
        generate() passes the cache as `cache` from transformers 5.24 on (`past_key_values` before);
        missing it would silently re-encode the image and the whole prefix at every step."""
        cache = cache if cache is not None else past_key_values
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len > 0:
            input_ids = input_ids[:, past_len:]
            pixel_values = None
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_index": kwargs.get("image_index") if pixel_values is not None else None,
            "share_image_states": bool(kwargs.get("share_image_states")) and pixel_values is not None,
            _CACHE_FIELD: cache,
            "use_cache": kwargs.get("use_cache", True),
        }
