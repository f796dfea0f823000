"""Routers: one file each, registered in moe/registry.py.

A router is built once, from its config (moe/routing.py's Routing, the settings every router
shares, plus its own dataclass), and offers:

- route(x_TD, token_ids_T=None, mask_T=None) -> Route (route.py): scores, expert ids, slots and
  combine weights of every route, its named losses ('balance', 'z_loss' if configured, and its
  own) and metrics ('expert_counts', 'dropped_fraction'); eval_k experts per token and no randomness in eval mode.
  A function of its inputs: nothing is left in the router. Blocks hand the Route to DeepSpeed's
  dispatch through the one adapter (parallel/deepspeed_internals.py); DeepSpeed's MOELayer still
  calls the router as its gate (forward), which answers from the route;
- kind (its registry name), k and eval_k (attributes: a schedule or evaluation may set them);
- probabilities(x_TD, token_ids_T=None): the [T, E] fp32 routing distribution, deterministic, for
  analysis;
- optionally set_training_step(step, max_steps), called before every step by the trainer's
  TrainingStepSchedule hook, for routers that schedule themselves (SMoE-Dropout's k, StableMoE's
  stage switch);
- optionally named losses of its own in its Route's losses (declared by its RouterSpec's loss_terms).

routers/base.py has the shared part: DeepSpeed's gating on the router's logits.

Its file defines its config dataclass (fields validated with the field named, prefixed with the
router's name) and SPEC = RouterSpec(build, config), build(router_cfg, moe_cfg, d_model, context).
"""
