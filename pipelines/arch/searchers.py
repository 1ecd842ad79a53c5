"""The searchers, each an Optuna sampler so that every one of them runs on a shared study
(several processes, several machines) the same way: random search (the baseline), a
REINFORCE controller (the reinforcement-learning search of AKD, Liu et al. 2020), regularised
evolution (Real et al. 2019), and Optuna's own TPE and NSGA-II.

The two written here keep no state of their own: each draw replays the study's finished
trials in order, so any worker that sees the same trials draws the same way, and a resumed
study carries on where it stopped.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from pipelines.config.arch import ArchSearchConfig

OVER_BUDGET = "over_budget"  # a trial's user attribute: refused before training, reward 0


def finished(study: optuna.Study) -> list[tuple[FrozenTrial, float]]:
    """The trials that have a reward, in order: completed ones (their value) and ones that
    successive halving stopped (their last reading)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.state == TrialState.COMPLETE and t.values is not None:
            out.append((t, float(t.user_attrs.get("reward", t.values[0]))))
        elif t.intermediate_values:
            out.append((t, float(t.intermediate_values[max(t.intermediate_values)])))
    return sorted(out, key=lambda pair: pair[0].number)


class _Replaying(BaseSampler):
    """A sampler that draws whole points (the family and its knobs) from the study's history."""

    def __init__(self, space: dict, seed: int):
        self.space, self.seed = space, seed
        self._fallback = RandomSampler(seed)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        from pipelines.arch.space import distributions

        return distributions(self.space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def _rng(self, trial: FrozenTrial) -> np.random.RandomState:
        return np.random.RandomState((self.seed * 100_003 + trial.number) % 2**32)

    def _fill(self, family: str, knobs: dict, rng: np.random.RandomState) -> dict:
        """Optuna's flat parameters of a point: the unused families' knobs are drawn too."""
        params = {"family": family}
        for fam, fam_knobs in self.space.items():
            for knob, values in fam_knobs.items():
                params[f"{fam}.{knob}"] = knobs[knob] if fam == family else values[rng.randint(len(values))]
        return params


class ReinforceSampler(_Replaying):
    """A controller of one softmax per decision (the family, each knob), trained by
    REINFORCE on the finished trials: advantage = reward standardised against the rewards
    before it, step ``lr`` on the log-probability of the decisions the trial took."""

    def __init__(self, space: dict, seed: int, lr: float = 0.5):
        super().__init__(space, seed)
        self.lr = lr

    def logits(self, study: optuna.Study) -> dict[str, np.ndarray]:
        logits = {"family": np.zeros(len(self.space))}
        logits |= {f"{f}.{k}": np.zeros(len(v)) for f, knobs in self.space.items() for k, v in knobs.items()}
        seen: list[float] = []
        for trial, reward in finished(study):
            if len(seen) >= 2:
                advantage = np.clip((reward - np.mean(seen)) / (np.std(seen) + 1e-3), -3, 3)
                family = trial.params["family"]
                taken = {"family": list(self.space).index(family)}
                taken |= {f"{family}.{k}": list(v).index(trial.params[f"{family}.{k}"])
                          for k, v in self.space[family].items()}
                for decision, index in taken.items():
                    p = _softmax(logits[decision])
                    logits[decision] += self.lr * advantage * (np.eye(len(p))[index] - p)
            seen.append(reward)
        return logits

    def sample_relative(self, study, trial, search_space) -> dict:
        logits, rng = self.logits(study), self._rng(trial)
        family = list(self.space)[rng.choice(len(self.space), p=_softmax(logits["family"]))]
        knobs = {k: v[rng.choice(len(v), p=_softmax(logits[f"{family}.{k}"]))]
                 for k, v in self.space[family].items()}
        return self._fill(family, knobs, rng)


class EvolutionSampler(_Replaying):
    """Regularised (aging) evolution: the first ``population`` points are random; then the
    population is the last ``population`` trained trials, ``tournament`` of them are drawn,
    and the best one's child changes one decision (the family, or one of its knobs)."""

    def __init__(self, space: dict, seed: int, population: int = 8, tournament: int = 3):
        super().__init__(space, seed)
        self.population, self.tournament = population, tournament

    def sample_relative(self, study, trial, search_space) -> dict:
        rng = self._rng(trial)
        history = [(t, r) for t, r in finished(study) if not t.user_attrs.get(OVER_BUDGET)]
        if len(history) < self.population:
            return self._random(rng)
        alive = history[-self.population:]
        drawn = [alive[i] for i in rng.choice(len(alive), size=min(self.tournament, len(alive)), replace=False)]
        parent = max(drawn, key=lambda pair: pair[1])[0]
        family = parent.params["family"]
        knobs = {k: parent.params[f"{family}.{k}"] for k in self.space[family]}
        decisions = ["family", *knobs] if len(self.space) > 1 else list(knobs)
        decision = decisions[rng.randint(len(decisions))]
        if decision == "family":
            family = rng.choice([f for f in self.space if f != family])
            knobs = {k: v[rng.randint(len(v))] for k, v in self.space[family].items()}
        else:
            others = [v for v in self.space[family][decision] if v != knobs[decision]]
            if others:
                knobs[decision] = others[rng.randint(len(others))]
        return self._fill(str(family), knobs, rng)

    def _random(self, rng: np.random.RandomState) -> dict:
        family = list(self.space)[rng.randint(len(self.space))]
        return self._fill(family, {k: v[rng.randint(len(v))] for k, v in self.space[family].items()}, rng)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def make_sampler(cfg: ArchSearchConfig) -> BaseSampler:
    """The sampler of ``arch_search.searcher``, seeded by ``arch_search.seed``."""
    if cfg.searcher == "random":
        return RandomSampler(seed=cfg.seed)
    if cfg.searcher == "reinforce":
        return ReinforceSampler(cfg.space, cfg.seed, cfg.controller_lr)
    if cfg.searcher == "evolution":
        return EvolutionSampler(cfg.space, cfg.seed, cfg.population, cfg.tournament)
    if cfg.searcher == "tpe":
        return TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=min(8, cfg.trials // 2 or 1))
    return NSGAIISampler(seed=cfg.seed, population_size=max(4, min(cfg.population, cfg.trials)),
                         constraints_func=lambda t: t.user_attrs.get("constraint", [0.0]))


def multi_objective(cfg: ArchSearchConfig) -> bool:
    """nsga2 trades held-out accuracy (up) against cost (down) as two objectives."""
    return cfg.searcher == "nsga2"

