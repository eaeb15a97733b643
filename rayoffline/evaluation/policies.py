"""Target policies for off-policy evaluation: K policies evaluated side by side (member dimension K).

The interface (`TargetPolicy`) that FQE (rayoffline/evaluation/fqe.py), the importance-sampling estimators and
the fitted behavior model share:

    K: int; discrete: bool; action_dim: int; device: torch.device; deterministic: bool
    act(obs)            deterministic / greedy action: (K, B, act) float in [-1, 1] | (K, B) int64
    sample(obs, n)      n draws: (n, K, B, act) | (n, K, B); a deterministic policy repeats act()
    log_prob(obs, a)    (K, B): log density (continuous, normalized action space) or log probability (discrete)
    probs(obs)          discrete only: (K, B, A) action probabilities

Observations are RAW dataset observations on the policy's device, (K, B, obs) with member k's rows for member
k, or (B, obs) shared by all K. Actions live in the algorithms' normalized space: continuous actions in [-1, 1]
as `Algorithm.norm_actions` maps dataset actions, discrete actions int64 indices. `deterministic` (an addition
to the shared note) tells FQE whether `act` is the whole policy (continuous targets then need no samples); a
policy without the attribute is treated as stochastic.

Implementations:
- `LearnedPolicy(algorithm, noise, epsilon)`: a trained rayoffline Algorithm's deterministic `policy()`. For
  densities a continuous policy is smoothed into N(mu(s), noise^2) per dimension and a discrete greedy one into
  epsilon-greedy (see Deviations). Calls run under torch.no_grad and leave the algorithm's training noise
  stream as they found it (BCQ samples inside `policy()`), as `rayoffline/learner/worker.py::_evaluate_aside`.
- `UniformPolicy(spec, K, device)`: uniform over [-1, 1]^act or over the A actions.
- `NegatedPolicy(policy)`: a deliberately bad policy: continuous a -> -a; discrete a -> (a + 1) mod A (the
  greedy action becomes the next one). Both are bijections of the action space, so densities carry over.
- `stack_policies([p1, p2, ...])`: K = sum of the parts' K; member k is answered by the part that holds it.
- `policy.select([0, 2])`: the policy over a subset of members (e.g. `--members 0,2`).

**Deviations**
- A deterministic continuous policy has no density; `LearnedPolicy.log_prob` is the Gaussian kernel
  N(mu(s), noise^2) (per dimension, in the normalized action space, not truncated to [-1, 1]). `sample` and
  `act` still give the deterministic action: the policy evaluated (by FQE, by rollouts) is the deterministic
  one, the kernel only serves the importance ratios.
- A discrete greedy policy with epsilon > 0 is epsilon-greedy in all four methods (probs, log_prob, sample; act
  stays greedy): there the smoothed policy is the evaluated one, because FQE uses `probs` exactly.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..nn.rng import MemberRNG
from ..spec import EnvSpec

STREAM_POLICY = 5
"""MemberRNG stream of the target policies' own draws (never an algorithm's training streams)."""
LOG_2PI = math.log(2.0 * math.pi)


class TargetPolicy:
    """K policies side by side (module docstring). Subclasses set K, discrete, action_dim, device and
    deterministic and implement act, log_prob and (discrete) probs; `sample` defaults to repeating `act` for
    deterministic policies and to drawing from `probs` for discrete ones."""

    K: int
    discrete: bool
    action_dim: int
    device: torch.device
    deterministic: bool = False

    # ----- the interface ------------------------------------------------------------------------------
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        if self.deterministic:
            a = self.act(obs)
            return a.unsqueeze(0).expand(n, *a.shape).clone()
        if self.discrete:
            p = self.probs(obs)                                                   # (K, B, A)
            u = self._rng().rand((n, *p.shape[1:-1]))                             # (K, n, B)
            cdf = p.cumsum(-1)                                                    # (K, B, A)
            idx = (u.unsqueeze(-1) >= cdf.unsqueeze(1)).sum(-1)                   # (K, n, B)
            return idx.clamp_max(self.action_dim - 1).transpose(0, 1).contiguous()
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}: probs() exists for discrete action spaces only")

    # ----- helpers ------------------------------------------------------------------------------------
    def select(self, members: Sequence[int]) -> "TargetPolicy":
        """The policy over `members` (in that order): member j of the result is member members[j] of this one."""
        return SelectedPolicy(self, members)

    def members_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observations as (K, B, obs) float32 on the policy's device ((B, obs) is shared by all K)."""
        obs = torch.as_tensor(obs).to(self.device, torch.float32)
        if obs.dim() == 2:
            obs = obs.unsqueeze(0).expand(self.K, *obs.shape)
        if obs.dim() != 3 or obs.shape[0] != self.K:
            raise ValueError(f"{type(self).__name__}: observations of shape {tuple(obs.shape)}; expected (K={self.K}, "
                             f"B, obs) or (B, obs)")
        return obs

    def members_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions as (K, B, act) float / (K, B) int64 on the device ((B, ...) is shared by all K)."""
        actions = torch.as_tensor(actions).to(self.device)
        plain = 1 if self.discrete else 2
        if actions.dim() == plain:
            actions = actions.unsqueeze(0).expand(self.K, *actions.shape)
        return actions.long() if self.discrete else actions.float()

    def _rng(self) -> MemberRNG:
        rng = getattr(self, "_draws", None)
        if rng is None:
            seeds = getattr(self, "seeds", None) or [0] * self.K
            rng = self._draws = MemberRNG(seeds, self.device, STREAM_POLICY)
        return rng

    def __repr__(self) -> str:
        kind = f"Discrete({self.action_dim})" if self.discrete else f"Box({self.action_dim},)"
        return f"{type(self).__name__}(K={self.K}, {kind})"


class LearnedPolicy(TargetPolicy):
    """A trained rayoffline Algorithm's K members as target policies (module docstring)."""

    def __init__(self, algorithm: Any, noise: float = 0.1, epsilon: float = 0.0) -> None:
        if noise <= 0.0:
            raise ConfigError(f"LearnedPolicy: noise (the kernel's std in the normalized action space) must be "
                              f"positive, got {noise}")
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"LearnedPolicy: epsilon must be in [0, 1], got {epsilon}")
        self.algorithm = algorithm
        self.K, self.discrete = algorithm.K, algorithm.spec.discrete
        self.action_dim, self.device = algorithm.spec.action_dim, algorithm.device
        self.seeds = list(algorithm.seeds)
        self.noise, self.epsilon = float(noise), float(epsilon)
        self.deterministic = not self.discrete or self.epsilon == 0.0

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        alg = self.algorithm
        obs = self.members_obs(obs)
        saved = alg.rng.get_state()
        try:
            with torch.no_grad():
                return alg.policy(alg.norm_obs(obs))
        finally:
            alg.rng.set_state(saved)

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        greedy = self.act(obs)                                                    # (K, B)
        p = torch.full((*greedy.shape, self.action_dim), self.epsilon / self.action_dim, device=self.device)
        return p.scatter_add_(-1, greedy.unsqueeze(-1), torch.full_like(p[..., :1], 1.0 - self.epsilon))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        actions = self.members_actions(actions)
        if self.discrete:
            return self.probs(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1).log()
        z = (actions - self.act(obs)) / self.noise                                # (K, B, act)
        return (-0.5 * z.square() - math.log(self.noise) - 0.5 * LOG_2PI).sum(-1)


class UniformPolicy(TargetPolicy):
    """Uniform over [-1, 1]^act (continuous) or the A actions (discrete). `act` (no mode exists) gives the
    center 0 of the box, or action 0."""

    def __init__(self, spec: EnvSpec, K: int = 1, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.K, self.discrete, self.action_dim = int(K), spec.discrete, spec.action_dim
        self.device = torch.device(device)
        self.seeds = [int(seed)] * self.K
        self.deterministic = False

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        b = self.members_obs(obs).shape[1]
        if self.discrete:
            return torch.zeros(self.K, b, dtype=torch.int64, device=self.device)
        return torch.zeros(self.K, b, self.action_dim, device=self.device)

    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        b = self.members_obs(obs).shape[1]
        if self.discrete:
            return self._rng().randint(self.action_dim, (n, b)).transpose(0, 1).contiguous()
        u = self._rng().rand((n, b, self.action_dim))                             # (K, n, B, act)
        return (2.0 * u - 1.0).transpose(0, 1).contiguous()

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        b = self.members_obs(obs).shape[1]
        return torch.full((self.K, b, self.action_dim), 1.0 / self.action_dim, device=self.device)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        actions = self.members_actions(actions)
        if self.discrete:
            return torch.full(actions.shape, -math.log(self.action_dim), device=self.device)
        inside = (actions.abs() <= 1.0).all(-1)
        return torch.where(inside, -self.action_dim * math.log(2.0), -math.inf)


class NegatedPolicy(TargetPolicy):
    """A deliberately bad policy from a good one: continuous a -> -a, discrete a -> (a + 1) mod A."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.base = policy
        self.K, self.discrete, self.action_dim = policy.K, policy.discrete, policy.action_dim
        self.device = policy.device
        self.deterministic = getattr(policy, "deterministic", False)

    def _map(self, a: torch.Tensor) -> torch.Tensor:
        return (a + 1) % self.action_dim if self.discrete else -a

    def _unmap(self, a: torch.Tensor) -> torch.Tensor:
        return (a - 1) % self.action_dim if self.discrete else -a

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self._map(self.base.act(obs))

    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        return self._map(self.base.sample(obs, n))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(obs, self._unmap(self.members_actions(actions)))

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        return torch.roll(self.base.probs(obs), 1, dims=-1)  # new[(a + 1) % A] = old[a]


class StackedPolicy(TargetPolicy):
    """Several TargetPolicies as one: member k is answered by the part that holds it (`stack_policies`)."""

    def __init__(self, parts: Sequence[TargetPolicy]) -> None:
        parts = list(parts)
        if not parts:
            raise ConfigError("stack_policies: give at least one policy")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if (p.discrete, p.action_dim) != (first.discrete, first.action_dim):
                raise ConfigError(f"stack_policies: policy {i} ({p!r}) does not share policy 0's action space "
                                  f"({first!r})")
            if torch.device(p.device) != torch.device(first.device):
                raise ConfigError(f"stack_policies: policy {i} is on {p.device}, policy 0 on {first.device}; "
                                  f"move them to one device")
        self.parts = parts
        self.K = sum(p.K for p in parts)
        self.discrete, self.action_dim, self.device = first.discrete, first.action_dim, first.device
        self.deterministic = all(getattr(p, "deterministic", False) for p in parts)
        self.bounds = [0]
        for p in parts:
            self.bounds.append(self.bounds[-1] + p.K)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.act(o) for p, o in zip(self.parts, self._split(self.members_obs(obs)))])

    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([p.sample(o, n) for p, o in zip(self.parts, self._split(self.members_obs(obs)))], dim=1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        obs, actions = self._split(self.members_obs(obs)), self._split(self.members_actions(actions))
        return torch.cat([p.log_prob(o, a) for p, o, a in zip(self.parts, obs, actions)])

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        return torch.cat([p.probs(o) for p, o in zip(self.parts, self._split(self.members_obs(obs)))])


def stack_policies(parts: Sequence[TargetPolicy]) -> TargetPolicy:
    """One TargetPolicy of sum(p.K) members: the parts' members in order."""
    return StackedPolicy(parts)


class SelectedPolicy(TargetPolicy):
    """Members `members` of `base`. The base policy runs on all its K members (the inputs of the members not
    selected are copies of the first selected member's) and the selected ones are read out."""

    def __init__(self, base: TargetPolicy, members: Sequence[int]) -> None:
        members = [int(m) for m in members]
        if not members or any(not 0 <= m < base.K for m in members):
            raise ConfigError(f"select: members {members} are not among the policy's {base.K} members "
                              f"(0..{base.K - 1})")
        self.base, self.members = base, members
        self.K, self.discrete, self.action_dim = len(members), base.discrete, base.action_dim
        self.device = base.device
        self.deterministic = getattr(base, "deterministic", False)
        self._index = torch.tensor(members, dtype=torch.int64, device=self.device)
        # which selected member's input each base member sees: its own where selected, else the first's
        fill = [0] * base.K
        for j, m in enumerate(members):
            fill[m] = j
        self._fill = torch.tensor(fill, dtype=torch.int64, device=self.device)

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        return x[self._fill]  # (K', ...) -> (K_base, ...)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.base.act(self._spread(self.members_obs(obs)))[self._index]

    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        return self.base.sample(self._spread(self.members_obs(obs)), n)[:, self._index]

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        obs, actions = self._spread(self.members_obs(obs)), self._spread(self.members_actions(actions))
        return self.base.log_prob(obs, actions)[self._index]

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        return self.base.probs(self._spread(self.members_obs(obs)))[self._index]
