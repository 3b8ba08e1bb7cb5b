"""ShardLoom models inside transformers: `AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`.

`python -m trainer.export` copies this file, unchanged except that `from trainer.models.X` becomes
`from .X`, into the export folder beside the model files it imports (layers, dense, hybrid, csa,
gated_deltanet), so the model transformers runs is the code the trainer trained, not a second copy.
The wrapper only adapts interfaces: HF config <-> our config dataclass, `forward` with HF's argument
names and output type, and generate()'s cache plumbing (our KVCache, which also carries Gated
DeltaNet's recurrent state). Weights live under `model.` (the trainer's state dict, prefixed).

Padding: the models take no attention mask. Right padding (what lm-evaluation-harness does for
scoring) is harmless for a causal model and accepted; anything else is refused rather than silently
attended to.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from trainer.models.dense import DenseConfig, DenseLM
from trainer.models.hybrid import HybridConfig, HybridLM

FAMILIES = {"dense": (DenseConfig, DenseLM), "hybrid": (HybridConfig, HybridLM)}
# transformers 5 renamed past_key_values to cache (in outputs, model kwargs and forward).
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ShardLoomConfig(PretrainedConfig):
    """`arch` ("dense" | "hybrid") and `shardloom`, every field of that family's config dataclass."""

    model_type = "shardloom"

    def __init__(self, arch: str = "dense", shardloom: dict | None = None, **kwargs):
        self.arch = arch
        self.shardloom = dict(shardloom or {})
        sl = self.shardloom
        # the names generic tools read (lm-eval's max length, accelerate's memory estimates)
        self.vocab_size = sl.get("vocab_size")
        self.hidden_size = sl.get("d_model")
        self.num_hidden_layers = sl.get("n_layers")
        self.max_position_embeddings = sl.get("max_seq_len")
        # Tying happens inside our model (no lm_head parameter at all): nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config(self):
        if self.arch not in FAMILIES:
            raise ValueError(f"config.json: arch {self.arch!r} is not one of {sorted(FAMILIES)}")
        cfg_cls, _ = FAMILIES[self.arch]
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        return cfg_cls(**{k: v for k, v in self.shardloom.items() if k in known})


def _check_padding(attention_mask, cached: bool) -> None:
    if attention_mask is None or bool(attention_mask.all()):
        return
    m = attention_mask.to(torch.int64)
    right_padded = bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())
    if cached or not right_padded:
        raise ValueError("ShardLoom models take no attention mask: only right padding of a whole sequence "
                         "is supported (left padding and padding during cached decoding are not)")


class ShardLoomForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ShardLoomConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: ShardLoomConfig):
        super().__init__(config)
        _, model_cls = FAMILIES[config.arch]
        self.model = model_cls(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        """Our model initialises itself (each family's own scheme); loading overwrites it anyway."""

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return None  # the head is the embedding (tied) or model.lm_head, used inside our forward

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache (KV + recurrent state) is made in forward, not an HF DynamicCache

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, return_dict=None,
                **kwargs):
        cache = kwargs.get(CACHE_KEY)
        _check_padding(attention_mask, cached=cache is not None and cache.pos > 0)
        if cache is None and use_cache:  # room for the prompt plus one context of new tokens
            cache = self.model.new_cache(input_ids.shape[0], input_ids.shape[1] + self.model.config.max_seq_len)
        logits = self.model(input_ids, cache)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs; the shift happens here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        cache = kwargs.get(CACHE_KEY)
        if cache is not None:
            input_ids = input_ids[:, cache.pos:]  # only what the cache has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                CACHE_KEY: cache}
