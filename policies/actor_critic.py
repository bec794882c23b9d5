"""The models PPO trains and queries: policy, critic (value head), reference.

Two layouts, one interface (`ActorCritic`):

- **shared LoRA** (default, least memory): ONE copy of the base weights (bf16, or 4-bit for QLoRA)
  carrying two LoRA adapters, `policy` and `critic`; the critic adds a value head on the last hidden
  state. The reference policy is the same base with the adapters switched off, so it costs no memory.
- **full**: the policy is a full trainable model, the critic a second full model with a value head,
  the reference a frozen copy of the initial policy.

Critic-free estimators (GRPO, RLOO, REINFORCE++) build no critic in either layout: no critic adapter,
no critic model, no value head (`has_critic` False, values None).

`forward()` computes policy logits and values in ONE call, so DDP and DeepSpeed see one forward
and one backward per micro-batch with every trainable parameter in the graph.

Shapes: B batch, T prompt+response tokens, V vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

POLICY, CRITIC = "policy", "critic"


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_dropout_rate(name: str, value: object) -> bool:
    """A float attribute that sets a dropout rate: `attention_dropout`, `hidden_dropout_prob`,
    `attn_pdrop`, ... and LayerDrop (`encoder_layerdrop`), which skips whole layers in train mode."""
    is_float = isinstance(value, float)
    return is_float and ("dropout" in name or name.endswith(("pdrop", "layerdrop")))


def model_configs(model: nn.Module) -> list:
    """Every transformers config reachable from `model` (a base model, or a peft model around one),
    with nested sub-configs (`text_config`, `vision_config`), each once."""
    from transformers import PretrainedConfig

    found: dict[int, PretrainedConfig] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        c = stack.pop()
        if isinstance(c, PretrainedConfig) and id(c) not in found:
            found[id(c)] = c
            stack.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return list(found.values())


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio pi_new/pi_old is only 1 at the start of an update if both passes are deterministic.

    Zeroing `nn.Dropout` modules is not enough: Llama/Qwen2/Mistral attention applies dropout from a
    float (`self.attention_dropout`, copied from `config.attention_dropout` at init) in train mode.
    So the float rates on every module and on every config are zeroed too; the config as well, because
    some models read it at forward time. A model saved afterwards carries the zeroed rates."""
    for m in model.modules():
        if isinstance(m, DROPOUT_MODULES):
            m.p = 0.0
        for name, value in list(vars(m).items()):  # plain attributes; parameters and submodules live elsewhere
            if is_dropout_rate(name, value):
                setattr(m, name, 0.0)
    for c in model_configs(model):
        for name, value in list(vars(c).items()):
            if is_dropout_rate(name, value):
                setattr(c, name, 0.0)


def backbone(lm: nn.Module) -> nn.Module:
    """The transformer body of a *ForCausalLM (or of a peft model wrapping one): hidden states, no logits."""
    if hasattr(lm, "get_base_model"):
        lm = lm.get_base_model()
    return getattr(lm, lm.base_model_prefix)


class ValueHead(nn.Module):
    """Scalar value per token from the critic's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Small init: values start near 0, like the rewards of a fresh run (lm-human-preferences).
        nn.init.normal_(self.summary.weight, std=1 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class ActorCritic(nn.Module):
    def __init__(self, policy: nn.Module, value_head: ValueHead | None, critic: nn.Module | None = None,
                 reference: nn.Module | None = None):
        """Shared-LoRA layout: `policy` is a PeftModel with adapters `policy` (and `critic`), and
        `critic`/`reference` are None. Full layout: separate models, `reference` given. No value head:
        no critic (critic-free estimators)."""
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic
        self.reference = reference
        self.shared = reference is None
        self.has_critic = value_head is not None
        if self.shared:
            # peft's set_adapter freezes the inactive adapter; we switch adapters inside one forward,
            # so remember what is trainable and restore it after every switch.
            self._adapter_params = [p for n, p in policy.named_parameters() if "lora_" in n]
            for p in self._adapter_params:
                p.requires_grad_(True)
        elif reference is not None:
            reference.requires_grad_(False)

    @contextmanager
    def adapter(self, name: str):
        if not self.shared:
            yield
            return
        self.policy.set_adapter(name)
        for p in self._adapter_params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            self.policy.set_adapter(POLICY)
            for p in self._adapter_params:
                p.requires_grad_(True)

    def policy_logits(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0) -> torch.Tensor:
        """(B, T, V), or (B, logits_to_keep, V) for the last positions only: the LM head over the prompt
        is wasted work, and with a large vocabulary most of the activation memory."""
        with self.adapter(POLICY):
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, logits_to_keep=logits_to_keep).logits

    def values(self, input_ids, attention_mask, position_ids) -> torch.Tensor | None:  # (B, T)
        if not self.has_critic:
            return None
        trunk = backbone(self.policy) if self.shared else self.critic
        with self.adapter(CRITIC):
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        return self.value_head(hidden)

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0) -> torch.Tensor:
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  logits_to_keep=logits_to_keep)
        if self.shared:
            with self.policy.disable_adapter():
                return self.policy(**kw).logits
        return self.reference(**kw).logits

    def forward(self, input_ids, attention_mask, position_ids, reference: bool = False, logits_to_keep: int = 0,
                values_only: bool = False, values: bool = True):
        """(policy logits (B, T or logits_to_keep, V), values (B, T)) in one call: what a training step
        needs; with `reference`, (reference logits, None); with `values_only`, (None, values); with
        `values=False`, (policy logits, None): no critic pass. Without a critic, values are None.
        Everything goes through forward so that a DeepSpeed engine wrapping this module sees (and,
        under ZeRO-3, gathers for) every call."""
        if reference:
            return self.reference_logits(input_ids, attention_mask, position_ids, logits_to_keep), None
        if values_only:  # (None, None) without a critic: `values` is None there
            return None, self.values(input_ids, attention_mask, position_ids)
        return (self.policy_logits(input_ids, attention_mask, position_ids, logits_to_keep),
                self.values(input_ids, attention_mask, position_ids) if values else None)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters as {"policy": [...], "critic": [...]} (the value head is the critic's):
        each gets its own learning rate and gradient clipping."""
        groups: dict[str, list[nn.Parameter]] = {POLICY: [], CRITIC: []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if self.shared:  # LoRA weights are named `...lora_A.<adapter>.weight`
                is_critic = name.startswith("value_head.") or f".{CRITIC}." in name
            else:
                is_critic = name.startswith(("value_head.", "critic."))
            groups[CRITIC if is_critic else POLICY].append(p)
        return groups

    def generation_model(self) -> nn.Module:
        """The module to call `.generate` on (the shared model has its policy adapter active)."""
        if self.shared:
            self.policy.set_adapter(POLICY)
            for p in self._adapter_params:
                p.requires_grad_(True)
        return self.policy


def build_shared_lora(base: nn.Module, lora_config, critic_lora_config=None, critic: bool = True) -> ActorCritic:
    """One base, two adapters (one without `critic`). `lora_config` is a peft LoraConfig (task CAUSAL_LM)."""
    from peft import get_peft_model

    disable_dropout(base)
    model = get_peft_model(base, lora_config, adapter_name=POLICY)
    if critic:
        model.add_adapter(CRITIC, critic_lora_config or lora_config)
    model.set_adapter(POLICY)
    disable_dropout(model)
    head = ValueHead(base.config.hidden_size) if critic else None
    return ActorCritic(model, head)


def build_full(policy: nn.Module, critic_lm: nn.Module | None, reference: nn.Module) -> ActorCritic:
    """Trainable policy, a separate critic (the body of `critic_lm`: its LM head would get no gradient,
    which DDP refuses; None: no critic), a frozen reference. Separately loaded models, not deep copies:
    under ZeRO-3 the weights are partitioned as they load, and a copy of a partitioned model is empty."""
    for m in (policy, critic_lm, reference):
        if m is not None:
            disable_dropout(m)
    head = ValueHead(policy.config.hidden_size) if critic_lm is not None else None
    critic = backbone(critic_lm) if critic_lm is not None else None
    return ActorCritic(policy, head, critic=critic, reference=reference.eval())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

