from tiaoyu_cli.model.config import PRESETS, ModelConfig, parse_overrides, preset
from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "PRESETS", "parse_overrides", "preset", "Transformer", "ModelOutput", "KVCache"]
