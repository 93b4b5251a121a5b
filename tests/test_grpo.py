"""Sibling-GRPO's pieces against hand-worked cases (genrec.models.grpo)."""

import math

import pytest
import torch

from genrec.core.config import RewardConfig, RlConfig
from genrec.models.grpo import (EPS, combined_reward, exact_reward, group_advantages, horizon_reward, k3_kl,
                                ndcg_rule_reward, policy_ratio_loss, ranking_reward, sibling_advantages)


def paths(*rows):
    """Candidate paths as node keys: each row a list of (root, n1, n2, item) tuples for one user."""
    return torch.tensor(rows, dtype=torch.long)


def test_exact_and_ranking_rewards_by_hand():
    items = torch.tensor([[5, 7, 3, 9], [1, 2, -1, -1], [4, 6, 8, 0]])
    target = torch.tensor([3, 2, 11])
    assert exact_reward(items, target).tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    r = ranking_reward(items, target)
    w1, w2 = 1 / math.log2(2), 1 / math.log2(3)
    # user 0: the hit at rank 3; ranks 1 and 2 are penalised in proportion to 1/log2(rank + 1), summing to -1
    assert r[0].tolist() == pytest.approx([-w1 / (w1 + w2), -w2 / (w1 + w2), 1.0, 0.0])
    assert r[1].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])  # empty slots earn nothing
    assert r[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # no hit: nothing to learn from, nothing penalised


def test_published_ndcg_rule_reward_by_hand():
    """MiniOneRec / V-STAR: G = 4, discounts 1/log2(2), 1/log2(3), 1/log2(4), 1/log2(5) = 1, 0.6309, 0.5, 0.4307
    (sum 2.5616); every non-target in a group with the target earns -discount / sum, the target 0."""
    items = torch.tensor([[5, 7, 3, 9], [3, 1, 2, 4], [4, 6, 8, 0], [2, -1, 6, -1]])
    target = torch.tensor([3, 3, 11, 6])
    got = ndcg_rule_reward(items, target)
    d = [1.0, 0.63093, 0.5, 0.43068]
    total = sum(d)  # 2.56161
    expected = [[-d[0] / total, -d[1] / total, 0.0, -d[3] / total],  # the target at rank 2: the others all pay
                [0.0, -d[1] / total, -d[2] / total, -d[3] / total],  # at rank 0: the ones below it pay too
                [0.0, 0.0, 0.0, 0.0],                                 # no target in the group: no signal
                [-d[0] / total, 0.0, 0.0, 0.0]]                        # empty slots earn 0
    assert torch.allclose(got, torch.tensor(expected), atol=1e-4)
    assert got[0].tolist() == pytest.approx([-0.39038, -0.24630, 0.0, -0.16813], abs=1e-4)
    published = combined_reward(items, target, {"exact": 1.0, "ndcg_rule": 1.0})  # the default RL reward
    assert published[1].tolist() == pytest.approx([1.0, -0.24630, -0.19519, -0.16813], abs=1e-4)
    assert RlConfig().rewards == {"exact": 1.0, "ndcg_rule": 1.0}


def test_combined_reward_weights_the_parts():
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    items, target = torch.tensor([[0, 1, 2]]), torch.tensor([1])
    got = combined_reward(items, target, {"exact": 2.0, "cosine": 0.5}, vectors)
    assert got[0].tolist() == pytest.approx([0.5 * 0.6, 2.0 + 0.5 * 1.0, 0.5 * 0.8])


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0], [1.0, 0.0, 5.0, 5.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    a = group_advantages(rewards, valid)
    std0 = math.sqrt(0.25 * 0.75)  # population std of (1, 0, 0, 0)
    assert a[0].tolist() == pytest.approx([0.75 / (std0 + EPS), -0.25 / (std0 + EPS)] + [-0.25 / (std0 + EPS)] * 2)
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards (the invalid slot is ignored): no signal
    assert a[2].tolist() == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0, 0.0])


def test_sibling_advantages_on_a_hand_worked_tree():
    # One user, four candidates. Level 0: all under the root, children A=1 (three candidates) and B=2 (one).
    # Level 1: under A the children 10 (two candidates) and 11 (one); under B only 12 (a parent with one child).
    # Level 2: under 10 the items 100, 101; under 11 only 102; under 12 only 103.
    nodes = paths([[0, 1, 10, 100], [0, 1, 10, 101], [0, 1, 11, 102], [0, 2, 12, 103]])
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.2]])
    adv, first = sibling_advantages(nodes, rewards, torch.ones(1, 4, dtype=torch.bool))
    # level 0: R(A) = mean(1, 0, .5) = .5, R(B) = .2; mean .35, std .15
    a_l0 = 0.15 / (0.15 + EPS)
    # level 1 under A: R(10) = .5, R(11) = .5 -> equal, advantage 0; under B a single child -> no group
    # level 2 under 10: R(100) = 1, R(101) = 0 -> mean .5, std .5
    a_l2 = 0.5 / (0.5 + EPS)
    expect = torch.tensor([[a_l0, 0.0, a_l2], [a_l0, 0.0, -a_l2], [a_l0, 0.0, 0.0], [-a_l0, 0.0, 0.0]])
    torch.testing.assert_close(adv[0], expect)
    # Each sibling node is carried once, by its first candidate; single children never.
    assert first[0].tolist() == [[True, True, True], [False, False, True], [False, True, False], [True, False, False]]


def test_sibling_groups_never_mix_contexts():
    """Two users with identical trees but different rewards: each gets its own advantages, as if alone."""
    tree = [[0, 1, 10, 100], [0, 2, 20, 200]]
    nodes = paths(tree, tree)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    adv, first = sibling_advantages(nodes, rewards, valid)
    for u in range(2):
        alone, alone_first = sibling_advantages(nodes[u: u + 1], rewards[u: u + 1], valid[u: u + 1])
        assert torch.equal(adv[u], alone[0]) and torch.equal(first[u], alone_first[0])
    assert adv[0, 0, 0] > 0 and adv[1, 0, 0] < 0


def test_sibling_advantages_skip_empty_slots():
    nodes = paths([[0, 1, 10, 100], [0, 2, 20, 200], [-1, -1, -1, -1]])
    adv, first = sibling_advantages(nodes, torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[True, True, False]]))
    assert adv[0, 2].tolist() == [0.0, 0.0, 0.0] and not first[0, 2].any()
    assert adv[0, 0, 0] == pytest.approx(0.5 / (0.5 + EPS))


def test_k3_kl_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -2.0])
    r = ref - logp
    assert k3_kl(logp, ref).tolist() == pytest.approx((r.exp() - r - 1).tolist())
    assert k3_kl(logp, ref)[0] == 0.0 and (k3_kl(logp, ref) >= 0).all()
    assert float(k3_kl(torch.tensor(-2.0), torch.tensor(-1.0))) == pytest.approx(math.e - 2)


def test_ppo_clip_by_hand():
    logp, old = torch.tensor([math.log(1.5), math.log(0.5)]), torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    assert policy_ratio_loss(logp, old, adv, None).tolist() == pytest.approx([-1.5, 0.5])
    # clipped: a positive advantage gains at most 1.2, a negative one loses at least 0.8 times the advantage
    assert policy_ratio_loss(logp, old, adv, 0.2).tolist() == pytest.approx([-1.2, 0.8])


def test_horizon_reward_by_hand():
    """r = sum over h of gamma^(h-1) [item == s(t+h)], H = 2, gamma = 0.7: 1 for the next item, 0.7 for the one after,
    nothing for items further on or for padding; with one item ahead it is the exact reward."""
    items = torch.tensor([[5, 7, 3, -1], [2, 9, 4, 1]])
    window = torch.tensor([[3, 7], [4, -1]])  # user 1's sequence ends after its next item
    got = horizon_reward(items, window, (1.0, 0.7))
    assert torch.allclose(got, torch.tensor([[0.0, 0.7, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert torch.equal(horizon_reward(items, window[:, :1], (1.0,)), exact_reward(items, window[:, 0]))
    # In a combined reward the window decides what a hit is: the ndcg_rule penalty applies to user 0's group,
    # which holds window items at ranks 1 and 2, so only ranks 0 (and not the empty slot) pay.
    total = combined_reward(items, window, {"exact": 1.0, "ndcg_rule": 1.0}, discounts=(1.0, 0.7))
    d = [1 / math.log2(i + 2) for i in range(4)]
    assert total[0].tolist() == pytest.approx([-d[0] / sum(d), 0.7, 1.0, 0.0], abs=1e-5)
    assert RewardConfig(kind="horizon").discounts == pytest.approx((1.0, 0.7))
    assert RewardConfig().discounts == (1.0,)  # the default is the next-item reward
