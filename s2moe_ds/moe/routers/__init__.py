"""Routers: one file each, registered in moe/registry.py.

A router is what DeepSpeed's MOELayer calls as its gate, so every router shares DeepSpeed's
dispatch, all-to-all pair, capacity and expert parallelism. It offers:

- forward(x_TD, used_token, sparse_routes=True, use_tutel=False): DeepSpeed's sparse-route gating
  tuple (l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts), with eval_k
  experts per token and no randomness in eval mode;
- kind (its registry name), eval_k, and last_dropped_fraction (the share of routes the last call
  dropped by capacity, read by the block right after the call);
- probabilities(x_TD, token_ids_T=None): the [T, E] fp32 routing distribution, deterministic, for
  analysis;
- optionally set_training_step(step, max_steps), called before every step by the trainer's
  TrainingStepSchedule hook, for routers that schedule themselves (SMoE-Dropout's k, StableMoE's
  stage switch);
- optionally named losses of its own in last_losses (declared by its RouterSpec's loss_terms).

routers/base.py has the shared part: DeepSpeed's gating on the router's logits.

Its file defines its config dataclass (fields validated with the field named, prefixed with the
router's name) and SPEC = RouterSpec(build, config).
"""
