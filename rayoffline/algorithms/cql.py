"""CQL: Conservative Q-Learning on top of SAC (continuous actions).

Kumar, Zhou, Tucker & Levine, "Conservative Q-Learning for Offline Reinforcement Learning", NeurIPS 2020
(https://arxiv.org/abs/2006.04779), the CQL(H) variant with importance sampling. Actions live in the
normalized space [-1, 1]. Twin critics Q_1, Q_2 with soft targets Q'_i, a tanh-Gaussian policy pi (state-
dependent std), entropy temperature alpha. Per member, expectations are means over its batch:

    policy:  u ~ N(mu(s), sigma(s)), a = tanh(u), log sigma(s) = clip(h(s), -20, 2) with h the network's second
             head; with log_std_offset c != 0: log sigma(s) = clip(m * h(s) + c, -20, 2), m and c learnable
    entropy: a_pi ~ pi(.|s),  L_alpha = -E[ log alpha * (log pi(a_pi|s) + H_target) ]     (H_target = -act_dim)
    actor:   L_pi = E[ alpha * log pi(a_pi|s) - min_i Q_i(s, a_pi) ]
             (first `bc_steps` steps: E[ alpha * log pi(a_pi|s) - log pi(a|s) ] with a the dataset action)
    critic:  a' ~ pi(.|s'),  y = r + gamma * (1 - term) * (min_i Q'_i(s', a') [- alpha * log pi(a'|s')])
             (max_target_backup: a' = argmax_n min_i Q'_i(s', a_n) over the N samples a_n ~ pi(.|s') below)
             L_TD = sum_i E[(Q_i(s, a) - y)^2]
             N actions from each of three sources, all scored at s: a_u ~ U[-1, 1]^d, a_c ~ pi(.|s),
             a_n ~ pi(.|s') (sampled actions carry no gradient). With importance sampling
             X_i = { Q_i(s, a_u) - log(0.5^d) } u { Q_i(s, a_n) - log pi(a_n|s') } u { Q_i(s, a_c) - log pi(a_c|s) }
             (3N terms; without it, the raw Q values of the three sources plus Q_i(s, a): 3N + 1 terms)
             gap_i = E[ clip(T * logsumexp(X_i / T) - Q_i(s, a), clip_diff_min, clip_diff_max) ]   (T = cql_temp)
             L_Q = L_TD + cql_alpha * sum_i gap_i                                       (the CQL penalty)
    Lagrange form (cql_lagrange): alpha' = clip(exp(log alpha'), 0, 1e6) and
             L_Q = L_TD + alpha' * cql_alpha * sum_i (gap_i - target_gap)
             L_alpha' = -1/2 * alpha' * cql_alpha * sum_i (gap_i - target_gap)          (gap_i without gradient)
    targets: Q'_i <- (1 - tau) Q'_i + tau Q_i after the critic step.

Groups, in the reference's order: `alpha` (with auto_entropy), `actor`, `cql_alpha` (with cql_lagrange),
`critic`. As in the reference code, every loss of a step is computed from the parameters before that step's
updates (the alpha in the actor and critic losses is the pre-update value), so the order only fixes when each
optimizer steps. Each group yields the (K,) vector of per-member losses.

Defaults: CORL's `cql.py` and its D4RL locomotion configs (the reference implementation publishing D4RL
scores): cql_alpha 10, 10 actions per source, importance sampling on, temperature 1, automatic entropy tuning
with target -act_dim and initial alpha 1, policy lr 3e-5, critic lr 3e-4, soft target rate 5e-3 every step,
3 x 256 hidden layers for actor and critics, no BC warm-up (bc_steps 0), Lagrange form off; its Lagrange
settings (target gap 0.8, log alpha' starting at 1.0, alpha' lr = critic lr) come from CORL's AntMaze configs,
the only ones that enable it. CORL's initialization is opt-in (next section): `orthogonal_init: true,
last_layer_gain: 0.01, log_std_offset: -1.0` give its networks; the defaults keep PyTorch's.

**CORL's initialization and AntMaze options** (non-member fields; every default reproduces the behavior from
before the options existed, bit for bit, with the same parameter set)
- `orthogonal_init`: each critic's hidden layers get W = sqrt(2) * (semi-)orthogonal, b = 0 (torch's
  `orthogonal_` on nn.Linear's (out, in) matrix, drawn per member copy from the member's own init generator, so
  member k still equals the K=1 network of its seed). The actor's hidden layers keep PyTorch's default, as in
  CORL: its TanhGaussianPolicy takes `orthogonal_init` but initializes without it (young-geng's CQL, which
  CORL ports, also makes the policy orthogonal; not offered).
- `last_layer_gain` g > 0: the output layers get b = 0 and xavier-uniform weights of gain g (bound
  g * sqrt(6 / (in + out))), except the critics' under `orthogonal_init`, orthogonal with gain g; this is CORL's
  `init_module_weights`, which CORL always applies with g = 1e-2. g = 0: PyTorch's default output layers.
- `log_std_offset` c != 0: the learnable affine m * h(s) + c on the log-std head, before the clamp, as CORL's
  `log_std_multiplier`/`log_std_offset` Scalars (CORL: m from 1, c from -1). Per member they are the (K,)
  parameters `actor.log_std_multiplier` (started at 1) and `actor.log_std_offset` (started at c), stepped
  with the actor (policy_lr). c = 0 means no affine, not an affine started at 0: the actor then has exactly
  the default's parameters, so checkpoints from before the option load unchanged (an affine started at
  (1, 0) would differ from none only through learning). The multiplier starts at CORL's default 1
  (young-geng's AntMaze recipe starts it at 0, a state-independent std at first; not offered).
- `max_target_backup`: the target's next action is the best of the N samples a_n ~ pi(.|s') the penalty draws
  anyway (CORL draws another N for it), and the entropy backup subtracts that sample's alpha * log pi; costs N
  target-critic evaluations per state instead of one.
- `clip_diff_min`/`clip_diff_max`: the clamp acts on each state's gap before the batch mean, as in CORL (states
  outside the bounds give the penalty no gradient); the Lagrange multiplier and the logged `cql_gap` see the
  clamped gap. YAML takes numbers or -.inf/.inf (the defaults: no clamp); min <= max is required.

**Measured effect** (2-core shared CPU box, torch threads 1). Training: builtin:pendulum-medium, 3000 steps,
hidden 2 x 64, batch 128, policy and alpha lr 3e-4 (10x CORL's, so that 3000 steps move the policy), other
settings default; seeds 0, 1, 2 as the members of one pass per setting; return = mean +- std over the seeds of
each member's mean over 10 evaluation episodes (behavior policy: -650); Q (dataset actions), gap and log pi
are training-log means over a window (steps 2751-3000 unless said). Baseline: -719 +- 111, Q -41.9, gap 3.92,
log pi 0.10. Initial networks: 10 seeds, 4096 standard-normal states, uniform actions.
- `orthogonal_init`: initial |Q| 0.047 vs 0.050 (3 x 256), 0.112 vs 0.101 (2 x 64); return -940 +- 183, Q -40.5,
  gap 3.91: lower return, but within the seed noise of 3 seeds (difference 1.8 standard errors).
- `last_layer_gain` 1e-2: initial |Q| 0.0008 vs 0.050 and policy mean |mu| 0.001 vs 0.050 (3 x 256), initial
  std 1.00 (0.994..1.005 across states) vs 1.02 (0.85..1.24); return -763 +- 108, Q -41.6: within noise.
- `log_std_offset` -1: initial std 0.37 (0.31..0.46 across states) vs 1.02 (3 x 256). The entropy bonus
  undoes it quickly: log pi over steps 1-25 -0.32 vs -0.68, equal to the baseline's from steps 76-100 on at
  policy lr 3e-4; at CORL's 3e-5 it stays above (-0.40 over 176-200, -0.62 vs -0.68 over 476-500). Return
  -779 +- 196: within noise.
- the three together (CORL's initialization): initial std 0.368 (0.366..0.370), |Q| 0.0010; return
  -922 +- 170, within noise (1.7 standard errors below the baseline).
- `max_target_backup`: Q -35.4 vs -41.9 (the max over 10 samples raises the target, i.e. the
  critic is less pessimistic), gap unchanged 3.91; return -711 +- 60: within noise. Step time +9% (K=3,
  2 x 64, batch 128: 15.3 vs 14.0 ms; 3 x 256, batch 256: 390 vs 360 ms).
- `clip_diff_min` -200 (young-geng's AntMaze recipe): never binds here (per-state gaps stay near +4): the run is
  identical to the baseline, bit for bit. `clip_diff_max` 1 (binding): logged gap 1.00 from the first log on,
  Q -36.0 (less conservative), log pi 0.37 vs 0.10, return -955 +- 63, below the baseline (about 3 standard
  errors): removing the penalty's gradient on states whose gap exceeds the bound costs return here.

**Deviations**
- The sampled actions reuse draws: the TD target's next action a' is the first of the N samples a_n ~ pi(.|s')
  (with max_target_backup, the best of them) and the actor/entropy losses use the first of the N samples
  a_c ~ pi(.|s) (CORL draws both independently). Each is still an exact sample; the estimators are only
  correlated. The policy network runs once on s and once on s' per step, and all 1 + 3N actions per state go
  through the critics in one batched call.
- BC warm-up maximizes the log-likelihood of the dataset actions (atanh of actions clipped to +-(1 - 1e-6));
  CORL's `log_prob` ignores its action argument and scores a fresh policy sample instead.
- Not implemented: alpha_multiplier (1), target_update_period (1). Reward scaling/bias belongs to the data
  pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..batch import Batch
from ..config import member, require
from ..nn.functional import frozen_copy, params, soft_update, twin_min
from ..nn.policies import TanhGaussianActor, TwinQ
from .base import AlgoConfig, Algorithm, Update

_squash = TanhGaussianActor.squash
_CHUNK_BYTES = 4 << 20  # activation bytes of one chunk of the penalty's critic call (about an L2 cache)


@dataclass(frozen=True)
class CQLConfig(AlgoConfig):
    hidden: tuple[int, ...] = (256, 256, 256)
    """Hidden layer widths of the actor and of each critic (CORL's CQL uses 3 x 256)."""
    cql_alpha: float = member(10.0)
    """Weight of the conservative penalty in the critic loss (the multiplier of alpha' in the Lagrange form)."""
    cql_n_actions: int = 10
    """Actions sampled per state from each source (uniform, policy at s, policy at s') for the logsumexp."""
    cql_importance_sample: bool = True
    """Subtract each sampled action's log-density (uniform or policy) inside the logsumexp (CQL(H) with IS)."""
    cql_temp: float = member(1.0)
    """Temperature T of the penalty's soft maximum T * logsumexp(Q / T)."""
    cql_lagrange: bool = False
    """Tune the penalty weight alpha' by dual gradient descent toward `cql_target_action_gap`."""
    cql_target_action_gap: float = member(0.8)
    """Lagrange form only: the penalty gap (logsumexp minus dataset Q) that alpha' drives the critics toward."""
    cql_alpha_lr: float = 3e-4
    """Lagrange form only: Adam learning rate of log alpha'."""
    entropy_alpha: float = member(1.0)
    """Initial SAC entropy temperature alpha (its fixed value when auto_entropy is off)."""
    auto_entropy: bool = True
    """Tune the entropy temperature so that the policy's entropy tracks `target_entropy`."""
    target_entropy: float | None = None
    """Target entropy of automatic tuning; null means -action_dim."""
    alpha_lr: float = 3e-5
    """Adam learning rate of log alpha (CORL uses the policy's)."""
    backup_entropy: bool = False
    """Subtract alpha * log pi(a'|s') from the bootstrapped target (soft Bellman backup)."""
    policy_lr: float = 3e-5
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    tau: float = 5e-3
    """Polyak rate of the critics' soft target update (every step)."""
    bc_steps: int = 0
    """Steps at the start whose actor loss is behavior cloning (log-likelihood of dataset actions) instead of
    max Q. CORL's default is 0; the original CQL code offers 10k-40k ("policy_eval_start") for AntMaze."""
    orthogonal_init: bool = False
    """Initialize the critics' hidden layers orthogonally with gain sqrt(2) and zero biases (CORL's
    `orthogonal_init`; as in CORL, the actor's hidden layers keep PyTorch's default)."""
    last_layer_gain: float = 0.0
    """0: PyTorch's default init for the output layers. > 0: zero bias and weights of that gain, xavier-uniform
    for the actor, and for the critics orthogonal with `orthogonal_init`, else xavier-uniform (CORL: 1e-2)."""
    log_std_offset: float = 0.0
    """0: log std is the actor's head. Otherwise log std = m * head + c with learnable per-member scalars m
    (started at 1) and c (started at this value; CORL: -1, an initial std near exp(-1))."""
    max_target_backup: bool = False
    """TD target from the best of the `cql_n_actions` next-action samples (max of min-twin target Q, with that
    sample's log-prob in the entropy backup) instead of one sample (CORL's `cql_max_target_backup`)."""
    clip_diff_min: float = -math.inf
    """Lower clamp of each state's penalty gap logsumexp - Q(s, a) before the batch mean (CORL's
    `cql_clip_diff_min`; -.inf: none)."""
    clip_diff_max: float = math.inf
    """Upper clamp of each state's penalty gap before the batch mean (CORL's `cql_clip_diff_max`; .inf: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.cql_alpha >= 0.0, "cql_alpha", f"must be >= 0, got {self.cql_alpha}")
        require(self.cql_n_actions >= 1, "cql_n_actions", f"must be a positive integer, got {self.cql_n_actions}")
        require(self.cql_temp > 0.0, "cql_temp", f"must be positive, got {self.cql_temp}")
        require(not self.cql_lagrange or self.cql_alpha > 0.0, "cql_alpha",
                "must be positive with cql_lagrange (it multiplies alpha'), got 0")
        require(self.entropy_alpha > 0.0, "entropy_alpha", f"must be positive, got {self.entropy_alpha}")
        require(self.target_entropy is None or math.isfinite(self.target_entropy), "target_entropy",
                f"must be a finite number or null, got {self.target_entropy}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.bc_steps >= 0, "bc_steps", f"must be >= 0, got {self.bc_steps}")
        for key in ("cql_alpha_lr", "alpha_lr", "policy_lr", "critic_lr"):
            require(getattr(self, key) > 0.0, key, f"must be positive, got {getattr(self, key)}")
        require(math.isfinite(self.last_layer_gain) and self.last_layer_gain >= 0.0, "last_layer_gain",
                f"must be a finite number >= 0 (0: PyTorch's default init), got {self.last_layer_gain}")
        require(math.isfinite(self.log_std_offset), "log_std_offset",
                f"must be a finite number (0: no learnable log-std affine), got {self.log_std_offset}")
        for key in ("clip_diff_min", "clip_diff_max"):
            require(not math.isnan(getattr(self, key)), key, "must be a number or -.inf/.inf, got nan")
        require(self.clip_diff_min <= self.clip_diff_max, "clip_diff_min",
                f"must be <= clip_diff_max, got {self.clip_diff_min} > {self.clip_diff_max}")


class CQL(Algorithm):
    name = "cql"
    networks = "actor and twin critics"
    Config = CQLConfig

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        # CORL's init_module_weights: orthogonal hidden layers for the critics only; output layers of gain g are
        # orthogonal for orthogonal critics, else xavier-uniform (the actor's always)
        last = ({} if cfg.last_layer_gain == 0.0 else
                {"last_init": "xavier", "last_gain": cfg.last_layer_gain})
        critic_last = ({} if cfg.last_layer_gain == 0.0 else
                       {"last_init": "orthogonal" if cfg.orthogonal_init else "xavier",
                        "last_gain": cfg.last_layer_gain})
        critic_hidden = {"init": "orthogonal", "gain": math.sqrt(2.0)} if cfg.orthogonal_init else {}
        self.actor = TanhGaussianActor(spec.obs_dim, spec.action_dim, cfg.hidden, gens,
                                       log_std_offset=cfg.log_std_offset or None, **last)
        self.critic = TwinQ(spec.obs_dim, spec.action_dim, cfg.hidden, gens, **critic_hidden, **critic_last)
        self.critic_target = frozen_copy(self.critic)
        if cfg.auto_entropy:
            alphas = torch.tensor([float(c.entropy_alpha) for c in self.configs])
            self.log_alpha = nn.Parameter(alphas.log())                          # (K,)
        if cfg.cql_lagrange:
            self.log_alpha_prime = nn.Parameter(torch.ones(len(self.configs)))   # (K,), alpha' = e at start
        self.target_entropy = (-float(spec.action_dim) if cfg.target_entropy is None
                               else float(cfg.target_entropy))

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        cfg = self.cfg
        groups: dict[str, tuple[list[nn.Parameter], float]] = {}
        if cfg.auto_entropy:
            groups["alpha"] = ([self.log_alpha], cfg.alpha_lr)
        groups["actor"] = (params(self.actor), cfg.policy_lr)
        if cfg.cql_lagrange:
            groups["cql_alpha"] = ([self.log_alpha_prime], cfg.cql_alpha_lr)
        groups["critic"] = (params(self.critic), cfg.critic_lr)
        return groups

    def branch_steps(self, step: int, member_steps: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """Compiled steps specialize on which members are in the BC warm-up (s <= bc_steps), nothing else."""
        bc = self.cfg.bc_steps
        return 0, tuple(1 if s <= bc else bc + 1 for s in member_steps)

    def update(self, batch: Batch, step: int) -> Update:
        cfg = self.cfg
        b = self.prepare(batch)
        obs, act, next_obs = b.observations, b.actions, b.next_observations  # (K,B,obs) (K,B,act) (K,B,obs)
        k, bs, na = act.shape
        n, m = cfg.cql_n_actions, 1 + 3 * cfg.cql_n_actions
        gamma = self.coef("discount")[:, None]                                 # (K, 1)

        eps_cur = self.rng.randn((bs, n, na))                                  # (K, B, N, act)
        eps_next = self.rng.randn((bs, n, na))                                 # (K, B, N, act)
        rand_act = self.rng.rand((bs, n, na)) * 2.0 - 1.0                      # (K, B, N, act) ~ U[-1, 1]
        alpha = self.log_alpha.detach().exp() if cfg.auto_entropy else self.coef("entropy_alpha")  # (K,)

        # policy at s: one forward; sample 0 (with gradient) feeds the actor and entropy losses
        mean, log_std = self.actor.dist(obs)                                   # (K, B, act) each
        pi, logp_pi = _squash(mean, log_std, eps_cur[:, :, 0])                 # (K, B, act), (K, B)

        with torch.no_grad():
            cur_act, cur_logp = _squash(mean.detach()[:, :, None], log_std.detach()[:, :, None], eps_cur)
            next_mean, next_log_std = self.actor.dist(next_obs)
            next_act, next_logp = _squash(next_mean[:, :, None], next_log_std[:, :, None], eps_next)
            # (K, B, N, act), (K, B, N) each; the TD target uses the first next-policy sample, or the best one
            if cfg.max_target_backup:
                obs_n = next_obs[:, :, None].expand(k, bs, n, next_obs.shape[-1]).reshape(k, bs * n, -1)
                next_q_n = twin_min(self.critic_target(obs_n, next_act.reshape(k, bs * n, na))).view(k, bs, n)
                next_q, best = next_q_n.max(dim=2)                             # (K, B) each
                backup_logp = next_logp.gather(2, best[..., None]).squeeze(2)  # (K, B)
            else:
                next_q = twin_min(self.critic_target(next_obs, next_act[:, :, 0]))  # (K, B)
                backup_logp = next_logp[:, :, 0]
            if cfg.backup_entropy:
                next_q = next_q - alpha[:, None] * backup_logp
            target = b.rewards + gamma * (1.0 - b.terminations) * next_q       # (K, B)

        # ----- losses, all from this step's pre-update parameters --------------------------------------
        if cfg.auto_entropy:
            alpha_loss = -self.log_alpha * (logp_pi.detach() + self.target_entropy).mean(1)  # (K,)

        warm = [s <= cfg.bc_steps for s in (self.member_steps or [step] * k)]  # per member: BC warm-up?
        if all(warm):
            actor_obj = self.actor.log_prob(obs, act)                          # (K, B)
        elif not any(warm):
            actor_obj = twin_min(self.critic(obs, pi))                         # (K, B)
        else:  # a pack whose members are at different steps
            mask = torch.tensor(warm, device=obs.device)[:, None]
            actor_obj = torch.where(mask, self.actor.log_prob(obs, act), twin_min(self.critic(obs, pi)))
        actor_loss = (alpha[:, None] * logp_pi - actor_obj).mean(1)            # (K,)

        # Every action is scored at s by the critics, M per state: [dataset | uniform | policy(s') | policy(s)],
        # in chunks of states whose activations stay about cache-sized (a third faster on CPU at K=4 than one call).
        actions = torch.cat([act[:, :, None], rand_act, next_act, cur_act], dim=2)    # (K, B, M, act)
        x = torch.cat([obs[:, :, None].expand(k, bs, m, obs.shape[-1]), actions], dim=-1)  # (K, B, M, obs+act)
        chunk = max(8, _CHUNK_BYTES // (4 * k * 2 * m * max(cfg.hidden)))
        q_all = torch.cat([self.critic.net(xc.reshape(k, -1, xc.shape[-1])).view(k, 2, -1, m)
                           for xc in x.split(chunk, dim=1)], dim=2)            # (K, 2, B, M)
        q_data = q_all[..., 0]                                                  # (K, 2, B)
        td_loss = (q_data - target[:, None]).square().mean(2).sum(1)           # (K,)
        if cfg.cql_importance_sample:
            log_density = torch.cat([rand_act.new_full((k, bs, n), na * math.log(2.0)), -next_logp, -cur_logp],
                                    dim=2)                                     # (K, B, 3N): -log density
            scores = q_all[..., 1:] + log_density[:, None]                     # (K, 2, B, 3N)
        else:
            scores = q_all                                                      # (K, 2, B, 3N + 1)
        temp = self.coef("cql_temp")[:, None, None]                            # (K, 1, 1)
        soft_max = torch.logsumexp(scores / temp[..., None], dim=-1) * temp    # (K, 2, B)
        diff = soft_max - q_data                                               # (K, 2, B)
        if cfg.clip_diff_min > -math.inf or cfg.clip_diff_max < math.inf:
            diff = diff.clamp(cfg.clip_diff_min, cfg.clip_diff_max)           # per state, as CORL
        gap = diff.mean(2)                                                      # (K, 2)
        cql_alpha = self.coef("cql_alpha")
        if cfg.cql_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)          # (K,)
            excess = gap - self.coef("cql_target_action_gap")[:, None]         # (K, 2)
            penalty = (alpha_prime.detach() * cql_alpha) * excess.sum(1)      # (K,)
            alpha_prime_loss = -0.5 * alpha_prime * cql_alpha * excess.detach().sum(1)
        else:
            penalty = cql_alpha * gap.sum(1)                                   # (K,)
        critic_loss = td_loss + penalty

        # ----- yields in the reference's order ---------------------------------------------------------
        if cfg.auto_entropy:
            yield "alpha", alpha_loss, {"entropy_alpha": alpha}
        yield "actor", actor_loss, {"log_pi": logp_pi.detach().mean(1)}
        if cfg.cql_lagrange:
            yield "cql_alpha", alpha_prime_loss, {"alpha_prime": alpha_prime.detach()}
        yield "critic", critic_loss, {"q_mean": q_data.detach().mean((1, 2)), "target_q": target.mean(1),
                                            "cql_gap": gap.detach().mean(1)}
        soft_update(self.critic_target, self.critic, cfg.tau)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, actions)                                       # (K, 2, B)


ALGORITHM = CQL
