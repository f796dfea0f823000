"""Every use of DeepSpeed's private names, in one module, checked against the installed version.

DeepSpeed's public MoE API is the `MoE` layer (constructor and forward) and the engine. Building
S2MoE and the routers on DeepSpeed's own dispatch needs more: the layer's inner `MOELayer`, its
experts list and gate, the gate's weight and settings, the `(l_aux, capacity, ...)` tuple of its
sparse-route gating, the expert-parallel process groups, the shared-memory comm build, and the
names of the checkpoint files. Those change between minor releases, so they are reached only
from here: a DeepSpeed upgrade is checked and mended in this one file, and `check_version` refuses
a release it was not checked against before anything else runs.
"""

import importlib
import re
from typing import Dict, List, Optional, Tuple

import deepspeed
import torch
from deepspeed.moe import sharded_moe
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from torch import nn

SUPPORTED = ((0, 19, 8), (0, 20, 0))
"""The DeepSpeed releases these internals were checked against: [first, last) as version tuples."""


def _version_tuple(text: str):
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def check_version(version: str = deepspeed.__version__) -> None:
    low, high = SUPPORTED
    if not low <= _version_tuple(version) < high:
        supported = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}"
        raise ImportError(
            f"s2moe-ds supports deepspeed {supported}, found {version}. S2MoE builds on DeepSpeed's MoE "
            f"internals (listed in {__name__}), which change between minor releases; install a supported "
            f"release (pip install 'deepspeed{supported}') or check that module against this one first.")


check_version()

__all__ = ["MoE", "TopKGate", "check_version"]

# ----------------------------------------------------------------------------- the MoE layer

EXPERT_PARAM_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
"""Where a MoE layer's state dict keeps its experts, followed by the expert index."""


def dispatcher(moe: MoE) -> nn.Module:
    """The layer's MOELayer: routes with its gate, runs the all-to-all pair and the experts (its
    forward pre-hooks see each dispatch's input first; dispatch() below calls it)."""
    return moe.deepspeed_moe


def local_experts(moe: MoE) -> List[nn.Module]:
    return list(moe.deepspeed_moe.experts.deepspeed_experts)


def experts_module(moe: MoE) -> nn.Module:
    """What the dispatch calls on its [ep_size, local experts, capacity, D] input (DeepSpeed's
    Experts: a loop over `deepspeed_experts`)."""
    return moe.deepspeed_moe.experts


def optimizer_names() -> List[str]:
    """The optimizer types a DeepSpeed config may name (DeepSpeed's own, lower case)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return list(DEEPSPEED_OPTIMIZERS)


def adopt_local_experts(new: nn.Module, experts: nn.Module) -> None:
    """Give `new` the expert modules of DeepSpeed's Experts `experts` under DeepSpeed's attribute
    name, so that the state-dict keys, expert parameter groups and per-expert files stay the same."""
    new.deepspeed_experts = experts.deepspeed_experts
    new.num_local_experts = experts.num_local_experts


def expert_modules(experts: nn.Module) -> nn.ModuleList:
    """The local expert modules of an experts module (DeepSpeed's or one that adopted them)."""
    return experts.deepspeed_experts


def set_experts_module(moe: MoE, experts: nn.Module) -> None:
    """Replace it; the new module must keep `deepspeed_experts` (the per-expert state-dict keys and
    files DeepSpeed writes) and `num_local_experts`."""
    moe.deepspeed_moe.experts = experts


def last_expert_counts(moe: MoE) -> torch.Tensor:
    """[E] routes per expert of the layer's last dispatch, as DeepSpeed's MOELayer keeps them (for
    tools that see only the model; a block's own forward returns them in its metrics)."""
    return moe.deepspeed_moe.exp_counts


def gate(moe: MoE) -> nn.Module:
    return moe.deepspeed_moe.gate


def set_gate(moe: MoE, new_gate: nn.Module) -> nn.Module:
    """Replace the layer's gate (by our router: it keeps the gate's place in the module tree and its
    state-dict keys); returns the gate it replaced."""
    replaced, moe.deepspeed_moe.gate = moe.deepspeed_moe.gate, new_gate
    return replaced


class _PairedMOELayer(sharded_moe.MOELayer):
    """DeepSpeed's MOELayer whose call with `pair_weight_2S` returns, for the 2S-token input
    [a; b], sum over the routes of a_s and of b_s of weight * gate * expert output: the S rows of a
    weighted pair in ONE combine. S2MoE's clean token and noisy copy are such a pair; combining
    them here skips the [2S, D] output of both paths and a mixing pass over it, forward and back.

    Gate, sparse encode, all-to-all pair, experts and sparse decode are DeepSpeed's own (the steps
    of MOELayer.forward); the combine is DeepSpeed's decode of the 2K routes of each output row.
    Without pair_weight_2S it is DeepSpeed's forward, unchanged."""

    def forward(self, *input: torch.Tensor, pair_weight_2S: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pair_weight_2S is None:
            return super().forward(*input)
        x_2SD = input[0].reshape(-1, input[0].shape[-1])
        two_s, d = x_2SD.shape
        self.l_aux, C, E, indices_K2S, locations_K2S, gates_K2S, self.exp_counts = self.gate(
            x_2SD, input[1], True, False)
        C = int(C)
        slots_K2S = sharded_moe._route_slots(indices_K2S, locations_K2S, E, C)
        dispatched_ECD = sharded_moe._sparse_encode(x_2SD, slots_K2S, E, C)
        if self.ep_size > 1:
            dispatched_ECD = sharded_moe._AllToAll.apply(self.ep_group, dispatched_ECD)
        out_ECD = self.experts(dispatched_ECD.reshape(self.ep_size, self.num_local_experts, -1, d))
        out_ECD = out_ECD.reshape(self.ep_size * self.num_local_experts, -1, d)
        if self.ep_size > 1:
            out_ECD = sharded_moe._AllToAll.apply(self.ep_group, out_ECD)
        # [K, 2S] routes -> [2K, S]: the K routes of a_s, then the K of b_s, for output row s.
        K, S = slots_K2S.shape[0], two_s // 2
        slots_RS = slots_K2S.view(K, 2, S).transpose(0, 1).reshape(2 * K, S)
        gates_RS = (gates_K2S * pair_weight_2S).view(K, 2, S).transpose(0, 1).reshape(2 * K, S)
        return sharded_moe._sparse_decode(out_ECD.reshape(E * C, d), slots_RS, gates_RS, S)


def enable_pair_dispatch(moe: MoE) -> None:
    """Give the layer's MOELayer the paired combine (the same module and state, one more way to
    combine; its plain forward is DeepSpeed's)."""
    if type(moe.deepspeed_moe) is sharded_moe.MOELayer:
        moe.deepspeed_moe.__class__ = _PairedMOELayer


def can_pair(moe: MoE) -> bool:
    """Whether the layer's dispatch is the plain one the paired combine reproduces: no Tutel, no
    tensor-parallel experts, no wall-clock timers (the engine may switch those on after build)."""
    layer = moe.deepspeed_moe
    return (isinstance(layer, _PairedMOELayer) and not layer.use_tutel and not layer.wall_clock_breakdown
            and sharded_moe.bwc_tensor_model_parallel_world_size(groups.mpu) == 1)


# ----------------------------------------------------------------------------- the top-k gate

GATE_LINEAR = "wg"
"""The name of the top-k gate's linear layer: its weight's key in DeepSpeed's checkpoints, which our
top-k router keeps so that checkpoints of either load into the other."""

def gate_arguments(gate_: TopKGate) -> Dict[str, object]:
    """A TopKGate's constructor arguments, read back from the gate."""
    return dict(model_dim=gate_.wg.in_features, num_experts=gate_.wg.out_features, k=gate_.k,
                capacity_factor=gate_.capacity_factor, eval_capacity_factor=gate_.eval_capacity_factor,
                min_capacity=gate_.min_capacity, noisy_gate_policy=gate_.noisy_gate_policy,
                drop_tokens=gate_.drop_tokens, use_rts=gate_.use_rts, ep_group=gate_.ep_group,
                top2_2nd_expert_sampling=gate_.top2_2nd_expert_sampling)


def gate_weight(gate_: TopKGate) -> torch.Tensor:
    """[num_experts, d_model]: the router's logits are x @ weight.T."""
    return gate_.wg.weight


def jitter(x: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's multiplicative jitter of router inputs (noisy_gate_policy 'Jitter')."""
    return sharded_moe.multiplicative_jitter(x, device=x.device)


# ----------------------------------------------------------------------------- routes and DeepSpeed's dispatch
#
# The one adapter between our typed routes (moe/routers/route.py's Route; parallel/ does not import
# moe/, so a route is read by its field names here) and DeepSpeed's sparse-route gating tuple
# (l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts). Nothing else
# indexes that tuple: routers get its parts by name from gate_on_logits, and a route goes back into
# DeepSpeed's MOELayer through dispatch (blocks) or gate_call (DeepSpeed calling the router).


def gate_on_logits(logits_TE: torch.Tensor, *, k: int, capacity_factor: float, min_capacity: int,
                   used_token: Optional[torch.Tensor], noisy_gate_policy: Optional[str], drop_tokens: bool,
                   use_rts: bool, ep_group, second_expert_sampling: bool) -> Dict[str, object]:
    """DeepSpeed's gating of TopKGate.forward on given fp32 logits (its top-1, top-2 or top-k
    function by k), so that every router keeps DeepSpeed's capacity, token dropping, positions and
    balance loss. Returns Route's fields expert_ids_TK, positions_TK, combine_weights_TK and
    capacity, and 'balance' (DeepSpeed's balance loss) and 'expert_counts' ([E], before drops)."""
    if k == 1:
        out = sharded_moe.top1gating(logits_TE, capacity_factor, min_capacity, used_token, noisy_gate_policy,
                                     drop_tokens, use_rts, ep_group, True, False)
    elif k == 2:
        out = sharded_moe.top2gating(logits_TE, capacity_factor, min_capacity, drop_tokens, ep_group,
                                     second_expert_sampling, True)
    else:
        out = sharded_moe.topkgating(logits_TE, k, capacity_factor, min_capacity, drop_tokens, ep_group,
                                     sparse_routes=True)
    l_aux, capacity, _, indices_KT, locations_KT, gates_KT, counts_E = out
    return dict(expert_ids_TK=indices_KT.t(), positions_TK=locations_KT.t(), combine_weights_TK=gates_KT.t(),
                capacity=capacity, balance=l_aux, expert_counts=counts_E)


def _sparse_gating(route) -> tuple:
    """The route as the sparse-route gating tuple MOELayer unpacks ([K, T] blocks, contiguous as
    DeepSpeed's own gating makes them: for its routes, the same tensors)."""
    return (route.losses["balance"], route.capacity, route.scores_TE.shape[1],
            route.expert_ids_TK.t().contiguous(), route.positions_TK.t().contiguous(),
            route.combine_weights_TK.t().contiguous(), route.metrics["expert_counts"])


def _dense_gating(route) -> tuple:
    """The route as the dense gating of TopKGate.forward(sparse_routes=False): (l_aux,
    combine_weights_TEC, dispatch_mask_TEC, exp_counts), the form DeepSpeed's gate returns by default."""
    kept_TK = route.expert_ids_TK >= 0
    T, E = route.scores_TE.shape
    token_TK = torch.arange(T, device=kept_TK.device).unsqueeze(1).expand_as(kept_TK)
    combine_TEC = route.combine_weights_TK.new_zeros(T, E, int(route.capacity)).index_put(
        (token_TK[kept_TK], route.expert_ids_TK[kept_TK].long(), route.positions_TK[kept_TK].long()),
        route.combine_weights_TK[kept_TK])
    return route.losses["balance"], combine_TEC, combine_TEC.bool(), route.metrics["expert_counts"]


class _Routed:
    """A route made before the dispatch. DeepSpeed's MOELayer hands its second argument (used_token)
    to its gate untouched, so a block's route travels there to the router (gate_call): the router
    keeps no state between the route and the dispatch, and DeepSpeed's dispatch (Tutel, tensor
    parallelism, timers) runs unchanged."""

    __slots__ = ("route",)

    def __init__(self, route) -> None:
        self.route = route


def gate_call(route_fn, x_TD: torch.Tensor, used_token, sparse_routes: bool):
    """A router's answer when DeepSpeed's MOELayer calls it as its gate: the ready route of
    dispatch, else route_fn(x_TD, mask_T=used_token) (DeepSpeed's own forward, as the drop-in
    MoE.forward runs it), as DeepSpeed's gating tuple (dense unless sparse_routes, as TopKGate)."""
    route = used_token.route if isinstance(used_token, _Routed) else route_fn(x_TD, mask_T=used_token)
    return _sparse_gating(route) if sparse_routes else _dense_gating(route)


def dispatch(moe: MoE, x: torch.Tensor, route, pair_weight_2S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSpeed's dispatch, all-to-all pair, experts and combine of x ([..., D], its tokens the
    route's T) along `route`; the output has x's shape. pair_weight_2S: the paired combine of
    _PairedMOELayer (can_pair says where it runs)."""
    extra = {} if pair_weight_2S is None else {"pair_weight_2S": pair_weight_2S}
    return moe.deepspeed_moe(x, _Routed(route), **extra)


def capacity_factor_holding(tokens: int, num_tokens: int, num_experts: int) -> float:
    """A capacity factor under which DeepSpeed's capacity, ceil(S / E * factor), holds `tokens`."""
    return max(tokens, 1) * num_experts / num_tokens


# ----------------------------------------------------------------------------- process groups


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> str:
    """DeepSpeed's expert-parallel and expert-data-parallel groups for ep_size, created with
    DeepSpeed's own function if absent (the engine then finds and uses them); their name."""
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return name


def expert_parallel_rank(group_name: str) -> int:
    return groups._get_expert_parallel_rank(group_name)


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's place among the ranks that hold the same experts (its ZeRO partition id of them)."""
    return groups._get_expert_data_parallel_rank(group_name)


def expert_parallel_world_size(group_name: str) -> int:
    return groups._get_expert_parallel_world_size(group_name)


def data_parallel_group():
    """The group that shares the non-expert weights (every rank, without model parallelism)."""
    return groups._get_data_parallel_group()


def use_data_before_expert_parallel(ds_config: Dict) -> bool:
    """The DeepSpeed config's rank topology for expert groups (E + D by default)."""
    return bool(ds_config.get("use_data_before_expert_parallelism", False))


# ----------------------------------------------------------------------------- start-up and engine


def skip_shm_comm_build() -> None:
    """On the CPU accelerator, DeepSpeed's comm backend JIT-compiles a shared-memory extension
    (30-120 s) that only `inference_all_reduce` uses; training never calls it.

    `deepspeed.comm.torch` must be fetched by module path: `import deepspeed.comm.torch as m`
    binds the torch package itself (name clash) and a patch on it does nothing."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def optimizer_name(engine) -> str:
    return type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__


# ----------------------------------------------------------------------------- checkpoint files

MODEL_STATES = "mp_rank_00_model_states.pt"
"""The engine's file of non-expert weights and client state (rank 0 writes it)."""
EXPERT_STATES_GLOB = "layer_*_expert_*_model_states.pt"
"""One file per MoE layer and GLOBAL expert id; its keys use the global id too."""
CLIENT_STATE_SKIP = ("module", "optimizer", "lr_scheduler")
"""Keys of MODEL_STATES that are the engine's, not the client state we passed to save_checkpoint."""
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
"""What a ZeRO engine's save copies into the checkpoints folder (`_copy_recovery_script`)."""


def skip_recovery_scripts(engine) -> None:
    """Keep a ZeRO save from copying RECOVERY_SCRIPTS beside the step folders: the copy follows a
    symbolic link found under that name, and the scripts unpickle with weights_only=False (and
    stop at our per-expert files; launch/consolidate.py is the tool)."""
    if hasattr(engine, "_copy_recovery_script"):
        engine._copy_recovery_script = lambda save_path: None



def checkpoint_globals() -> List[type]:
    """The classes DeepSpeed pickles into its checkpoint files (ZeRO 1/2 optimizer states, loss
    scaler), which a weights-only load must be allowed to rebuild; nothing else of DeepSpeed's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def set_checkpoint_loader(engine, load) -> None:
    """Make every file DeepSpeed reads for `engine.load_checkpoint` (model states, per-expert
    files, ZeRO optimizer shards) go through load(path, map_location=None)."""
    engine.checkpoint_engine.load = load


def full_fp32_param(param) -> torch.Tensor:
    """The whole fp32 master weight of a ZeRO 1/2 parameter (a collective over its partition group)."""
    from deepspeed.utils import safe_get_full_fp32_param
    return safe_get_full_fp32_param(param)


def full_optimizer_state(param, key: str):
    """The whole optimizer state `key` of a parameter (a collective), or None before any state exists."""
    from deepspeed.utils import safe_get_full_optimizer_state
    try:
        return safe_get_full_optimizer_state(param, key)
    except ValueError:  # DeepSpeed links its views of the states only after the first step
        return None


def own_fragment(param, keys) -> Optional[Tuple[int, int, Dict[str, torch.Tensor]]]:
    """(start, numel, views) of the piece of a ZeRO 1/2 parameter that this rank's flat fp32
    partition holds: its range in the flattened parameter, and views of it in the fp32 master
    ('fp32') and in each optimizer state of `keys` (linked first: create_optimizer_states). None
    where this rank's partition holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    views = {"fp32": mapping.get_hp_fragment(), **{key: mapping.get_hp_fragment(key) for key in keys}}
    return int(address.start), int(address.numel), views


def create_optimizer_states(engine, step, keys) -> None:
    """Give each flat fp32 partition of the ZeRO 1/2 optimizer its Adam states (zeros, `step`),
    which DeepSpeed otherwise creates at the first step, and link DeepSpeed's per-parameter views
    of them, so that own_fragment's views can be filled."""
    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise RuntimeError("resharding needs DeepSpeed's ZeRO stage 1 or 2 optimizer")
    for flat in zero.single_partition_of_fp32_groups:
        state = {key: torch.zeros_like(flat) for key in keys}
        state["step"] = step.clone() if torch.is_tensor(step) else step
        zero.optimizer.state[flat] = state
    link_optimizer_states(engine)


def link_optimizer_states(engine) -> None:
    """(Re)link DeepSpeed's per-parameter views of the optimizer states. DeepSpeed links them once,
    right after the first group's first step, when the expert groups' states do not exist yet:
    without this, an expert's moments cannot be read through safe_get_full_optimizer_state."""
    zero = engine.optimizer
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def set_engine_counters(engine, global_steps: int, global_samples: int, skipped_steps: int) -> None:
    engine.global_steps, engine.global_samples, engine.skipped_steps = global_steps, global_samples, skipped_steps


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """An expert's parameter: DeepSpeed all-reduces it over its expert-data-parallel group only."""
    return getattr(param, "allreduce", True) is False


def expert_group_name(param: torch.nn.Parameter) -> str:
    """The expert-parallel group an expert's parameter belongs to ("ep_size_<E>")."""
    return param.group_name


def replace_zero0_clipping(engine, clip, norm) -> None:
    """ZeRO 0 with experts: DeepSpeed's own norm is wrong (issue 17). fp32: the engine clips with
    `clip_grad_norm_`, which averages each rank's norm over the data-parallel group (each rank's
    experts differ, so that is no norm) and keeps no value to log; `clip(params)` replaces it and
    returns the norm, kept as the engine's global grad norm. bf16 (DeepSpeed's unfused optimizer):
    the norm leaves the experts out; `norm(params)` of the bf16 parameters' gradients (scaled by
    the loss scale, as DeepSpeed's is) replaces it. Engines of other stages are left alone."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    optimizer = engine.optimizer
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        original = optimizer.unscale_and_clip_grads

        def unscale_and_clip_grads(_wrong_norm, apply_scale=True):
            optimizer._global_grad_norm = float(norm([p for group in optimizer.fp16_groups for p in group]))
            return original(optimizer._global_grad_norm, apply_scale)
        optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    elif engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        def clip_fp32_gradients():
            engine._global_grad_norm = float(clip(list(engine.module.parameters())))
        engine.clip_fp32_gradients = clip_fp32_gradients
