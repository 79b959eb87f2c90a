"""Configuration of refloop-tiny, the embedded default VLM."""

from __future__ import annotations

from transformers import PretrainedConfig


class RefloopTinyConfig(PretrainedConfig):
    """A conv image encoder with coordinate channels feeding a small pre-norm decoder.

    Token ids of the special tokens are stored here so the model can find image, region and
    pointer (cell) tokens without its tokenizer.
    """

    model_type = "refloop-tiny"

    def __init__(
        self,
        vocab_size: int = 512,
        image_size: int = 112,
        grid_size: int = 7,
        vision_channels: tuple[int, ...] = (24, 48, 96, 128),
        hidden_size: int = 160,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 432,
        max_position_embeddings: int = 192,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        image_token_id: int = 4,
        region_token_id: int = 5,
        cell_token_start: int = 0,
        coord_token_start: int = 0,
        num_coord_bins: int = 101,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.image_size = image_size
        self.grid_size = grid_size
        self.vision_channels = list(vision_channels)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.image_token_id = image_token_id
        self.region_token_id = region_token_id
        self.cell_token_start = cell_token_start
        self.coord_token_start = coord_token_start
        self.num_coord_bins = num_coord_bins
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def num_cells(self) -> int:
        return self.grid_size * self.grid_size
