import math

import pytest
import torch

from refloop.training.ppo import clipped_policy_loss, pad_rows, token_rewards, value_free_advantages


def test_token_rewards_put_iou_on_last_token_and_kl_on_every_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    iou = torch.tensor([0.8, 0.0])
    r = token_rewards(logp, ref, mask, iou, beta=0.1)
    # row 0: -0.1*(0.5), -0.1*0, -0.1*0.5 + 0.8 ; row 1: -0.1*(-0.5), -0.1*(2), padding 0
    expected = torch.tensor([[-0.05, 0.0, 0.75], [0.05, -0.2, 0.0]])
    assert torch.allclose(r, expected)


def test_unparseable_box_gives_zero_reward_beyond_kl():
    logp = torch.tensor([[-1.0, -1.0]])
    r = token_rewards(logp, logp.clone(), torch.ones(1, 2), torch.tensor([0.0]), beta=0.01)
    assert torch.equal(r, torch.zeros(1, 2))


def test_value_free_advantage_is_return_to_go_minus_baseline():
    rewards = torch.tensor([[-0.05, 0.0, 0.75], [0.05, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = value_free_advantages(rewards, mask, baseline=torch.tensor([0.5, 0.1]))
    expected = torch.tensor([[0.70 - 0.5, 0.75 - 0.5, 0.75 - 0.5], [-0.15 - 0.1, -0.2 - 0.1, 0.0]])
    assert torch.allclose(adv, expected)


def test_clipped_loss_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 0: min(1.5*1, 1.2*1) = 1.2 ; token 1: min(0.5, 0.8) = 0.5 ; token 2: min(1.1*-2, 1.1*-2) = -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    k3 = ((1.5 - 1) - math.log(1.5) + (0.5 - 1) - math.log(0.5) + (1.1 - 1) - math.log(1.1)) / 3
    assert stats["approx_kl"] == pytest.approx(k3)


def test_clipped_loss_gradient_vanishes_where_clipped():
    new = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    assert new.grad[0, 0] == 0.0
    assert new.grad[0, 1] == pytest.approx(-1.1 / 2)


def test_padding_tokens_do_not_count():
    new = torch.tensor([[0.1, 5.0]])
    loss, stats = clipped_policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-min(math.exp(0.1), 1.2))
    assert stats["clipfrac"] == 0.0


def test_pad_rows():
    out, mask = pad_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    assert out.tolist() == [[1.0, 2.0], [3.0, 0.0]] and mask.tolist() == [[1, 1], [1, 0]]
