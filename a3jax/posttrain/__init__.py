"""Post-training with exact likelihoods (docs/post-training.md).

    a3jax.posttrain.policy    per-token log-probs of sampled completions: exact (A3, realised grouping)
                              or diffu-GRPO's one-step estimate (mdlm)
    a3jax.posttrain.rollout   G completions per prompt from the decoder, with the realised grouping
    a3jax.posttrain.grpo      group advantages, the clipped-ratio + KL loss, the jitted update
    a3jax.posttrain.rewards   exact_match, regex, unit_tests, or package.module:function
    a3jax.posttrain.loop      the run: checkpoints, metrics, rollout log, resume (`a3jax rl`)

SFT runs through `a3jax train` with data.format=sft (a3jax.data.sft; chat templates: a3jax.data.chat).
"""
