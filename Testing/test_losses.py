"""The training loss: plain Dice + CE equals MONAI's DiceCELoss; region weight scales exactly the
emphasised voxels' share of the gradient."""
import pytest
import torch
from monai.losses import DiceCELoss

from MMContourLib.training.losses import weighted_dice_ce


@pytest.mark.parametrize("shape", [(2, 2, 8, 8, 4), (1, 2, 5, 7, 3), (3, 3, 4, 4, 4)])
def test_without_emphasis_it_is_monai_dice_ce(shape):
    torch.manual_seed(sum(shape))
    logits = torch.randn(shape)
    label = torch.randint(0, shape[1], (shape[0], 1, *shape[2:])).float()
    expected = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=1.0)(logits, label)
    torch.testing.assert_close(weighted_dice_ce(logits, label), expected)
    emphasis = torch.rand(shape[0], 1, *shape[2:])
    torch.testing.assert_close(weighted_dice_ce(logits, label, emphasis, 0.0), expected)
    assert not torch.isclose(weighted_dice_ce(logits, label, emphasis, 5.0), expected)


@pytest.mark.parametrize("w", [1.0, 5.0])
def test_an_emphasised_voxel_gets_1_plus_w_times_the_gradient_of_an_identical_plain_one(w):
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 6, 6, 4)
    logits[0, :, 1, 1, 1] = logits[0, :, 4, 4, 2] = torch.tensor([0.3, -0.2])  # two identical voxels ...
    label = (torch.rand(1, 1, 6, 6, 4) > 0.6).float()
    label[0, 0, 1, 1, 1] = label[0, 0, 4, 4, 2] = 1.0  # ... with the same target
    emphasis = torch.zeros_like(label)
    emphasis[0, 0, 1, 1, 1] = 1.0  # only the first is in an emphasised region
    emphasis[0, 0, 0, 0, 0] = 0.5  # a partial-volume voxel elsewhere
    logits.requires_grad_(True)
    weighted_dice_ce(logits, label, emphasis, w).backward()
    g = logits.grad[0]
    torch.testing.assert_close(g[:, 1, 1, 1], (1 + w) * g[:, 4, 4, 2])
    # and with w = 0 both get the same gradient
    logits.grad = None
    weighted_dice_ce(logits, label, emphasis, 0.0).backward()
    torch.testing.assert_close(logits.grad[0][:, 1, 1, 1], logits.grad[0][:, 4, 4, 2])


def test_emphasis_raises_the_loss_of_missing_the_emphasised_region():
    """A prediction that covers the big region and misses the small one: the emphasis makes the miss cost more."""
    label = torch.zeros(1, 1, 16, 16, 8)
    label[..., 2:12, 2:12, 1:7] = 1  # "breast"
    label[..., 13:15, 13:15, 3:5] = 1  # small "nodal" region
    emphasis = torch.zeros_like(label)
    emphasis[..., 13:15, 13:15, 3:5] = 1
    miss = torch.zeros_like(label)
    miss[..., 2:12, 2:12, 1:7] = 1
    logits = torch.cat([-(miss * 8 - 4), miss * 8 - 4], dim=1)
    plain = float(weighted_dice_ce(logits, label))
    emphasised = float(weighted_dice_ce(logits, label, emphasis, 5.0))
    assert emphasised > 3 * plain


def test_soft_targets_with_0_1_values_are_the_hard_loss():
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 6, 6, 4)
    label = (torch.rand(2, 1, 6, 6, 4) > 0.5).float()
    emphasis = torch.rand(2, 1, 6, 6, 4)
    for w in (0.0, 5.0):
        torch.testing.assert_close(weighted_dice_ce(logits, label, emphasis, w, soft=label),
                                   weighted_dice_ce(logits, label, emphasis, w))


def test_soft_targets_prefer_the_partial_volume_fraction_to_its_rounding():
    """A thin structure on a coarse grid: border voxels are 30-70 % inside. With soft targets the
    prediction that gives those fractions beats the one that rounds them; with hard targets it is the reverse."""
    torch.manual_seed(0)
    fraction = torch.zeros(1, 1, 12, 12, 6)
    fraction[..., 4:8, 4:8, 1:5] = 1.0
    fraction[..., 3, 4:8, 1:5] = 0.3
    fraction[..., 8, 4:8, 1:5] = 0.7
    hard = (fraction > 0.5).float()

    def logits_for(p):
        p = p.clamp(0.02, 0.98)
        return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)

    soft_fit, rounded = logits_for(fraction), logits_for(hard)
    assert weighted_dice_ce(soft_fit, hard, soft=fraction) < weighted_dice_ce(rounded, hard, soft=fraction)
    assert weighted_dice_ce(rounded, hard) < weighted_dice_ce(soft_fit, hard)
    with pytest.raises(ValueError, match="2 classes"):
        weighted_dice_ce(torch.randn(1, 3, 4, 4, 4), hard[..., :4, :4, :4], soft=fraction[..., :4, :4, :4])
