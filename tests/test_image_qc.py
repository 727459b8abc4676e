"""MRQy image-quality metrics on synthetic images with known answers, a real
series, and the robust history comparison (pipelines/image_qc.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.image_qc import (
    METRICS,
    TISSUE_METRICS,
    compare_metrics_to_history,
    compare_to_history,
    efc,
    head_mask_from_image,
    image_quality,
    otsu_threshold,
    robust_z,
)
from tests.shared_data import DATA, needs_data

MU_LOW, MU_HIGH, SIGMA = 100.0, 200.0, 10.0


def two_class_phantom(sigma=SIGMA, seed=0):
    """64x80x80 volume, 1 mm: a 32x48x48 head box whose left half is MU_LOW and
    right half MU_HIGH, zero-mean background (16 voxels of air around it);
    Gaussian noise ``sigma`` everywhere. Head mask = brain mask = the box."""
    rng = np.random.default_rng(seed)
    clean = np.zeros((64, 80, 80))
    head = np.zeros(clean.shape, bool)
    head[16:48, 16:64, 16:64] = True
    clean[16:48, 16:64, 16:40] = MU_LOW
    clean[16:48, 16:64, 40:64] = MU_HIGH
    return clean + rng.normal(0, sigma, clean.shape), head


@pytest.fixture(scope="module")
def phantom_result():
    img, head = two_class_phantom()
    return image_quality(img, head, head, spacing_zyx=(1, 1, 1))


def test_global_metrics_match_the_mixture(phantom_result):
    m = phantom_result.metrics
    assert set(m) == set(METRICS) | set(TISSUE_METRICS)
    mean = 0.5 * (MU_LOW + MU_HIGH)
    std_f = math.sqrt(SIGMA ** 2 + 0.25 * (MU_HIGH - MU_LOW) ** 2)   # noise + between-class spread
    assert m["MEAN"] == pytest.approx(mean, rel=0.005)
    assert m["VAR"] == pytest.approx(std_f ** 2, rel=0.02)
    assert m["CV"] == pytest.approx(100 * std_f / mean, rel=0.02)
    assert m["SNR1"] == pytest.approx(std_f / SIGMA, rel=0.02)
    assert m["CJV"] == pytest.approx((std_f + SIGMA) / mean, rel=0.02)
    # range: the class extremes plus noise tails, about 100 + 2 * 4.5 sigma
    assert 150 < m["RNG"] < 220


def test_patch_metrics_match_the_bright_class(phantom_result):
    m = phantom_result.metrics
    snr = MU_HIGH / SIGMA
    # SNR2 uses the whole background; the brightest patch mean is biased up by < 0.5 sigma
    assert m["SNR2"] == pytest.approx(snr, rel=0.04)
    # SNR3/4, CNR, CVP use a 125-voxel patch std (relative SD ~ 6 %)
    assert m["SNR3"] == pytest.approx(snr, rel=0.15)
    assert m["SNR4"] == pytest.approx(snr, rel=0.15)
    assert m["CNR"] == pytest.approx(snr, rel=0.15)
    assert m["CVP"] == pytest.approx(SIGMA / MU_HIGH, rel=0.15)
    z, y, x = phantom_result.details["foreground_patch_centre_zyx"]
    assert x >= 42   # the patch lies in the bright half, entirely
    assert phantom_result.details["patch_shape_zyx"] == [5, 5, 5]


def test_tissue_contrast_matches_analytic(phantom_result):
    m = phantom_result.metrics
    delta = MU_HIGH - MU_LOW
    assert m["CJV_TISSUE"] == pytest.approx(2 * SIGMA / delta, rel=0.03)
    assert m["CNR_TISSUE"] == pytest.approx(delta / (math.sqrt(3) * SIGMA), rel=0.03)
    t = phantom_result.details["tissue"]
    assert MU_LOW + 3 * SIGMA < t["threshold"] < MU_HIGH - 3 * SIGMA
    assert t["low"]["mean"] == pytest.approx(MU_LOW, abs=0.5)


def test_background_patch_keeps_away_from_a_tight_head_mask():
    img, head = two_class_phantom()
    img[14:50, 14:66, 64:67] += MU_HIGH            # bright tissue rim just outside the head mask
    r = image_quality(img, head, head)
    z, y, x = r.details["background_patch_centre_zyx"]
    assert min(abs(x - 63), abs(x - 16)) >= 7 or not (16 <= y < 64 and 16 <= z < 48)
    assert r.metrics["SNR4"] == pytest.approx(MU_HIGH / SIGMA, rel=0.15)   # noise, not the rim


def test_more_noise_lowers_snr_and_psnr_and_raises_cjv():
    lo = image_quality(*two_class_phantom(sigma=5.0), spacing_zyx=(1, 1, 1)).metrics
    hi = image_quality(*two_class_phantom(sigma=20.0), spacing_zyx=(1, 1, 1)).metrics
    for k in ("SNR1", "SNR2", "SNR3", "SNR4", "CNR", "PSNR", "CNR_TISSUE"):
        assert lo[k] > hi[k], k
    for k in ("CJV", "CJV_TISSUE", "CVP"):
        assert lo[k] < hi[k], k
    # quadrupling sigma quarters SNR2 (the patch mean barely moves)
    assert lo["SNR2"] / hi["SNR2"] == pytest.approx(4.0, rel=0.06)


def test_cpp_of_gaussian_noise():
    rng = np.random.default_rng(1)
    img = 500.0 + rng.normal(0, SIGMA, (20, 80, 80))
    r = image_quality(img, np.ones(img.shape, bool), spacing_zyx=(1, 1, 1))
    # |x0 - mean of 8 neighbours|: Gaussian with sd sigma*sqrt(9/8), mean abs * sqrt(2/pi)
    assert r.metrics["CPP"] == pytest.approx(SIGMA * math.sqrt(9 / 8) * math.sqrt(2 / math.pi), rel=0.03)
    # no background at all: the background metrics are undefined, with a reason
    assert r.metrics["SNR1"] is None and r.metrics["FBER"] is None and r.metrics["CJV"] is None
    assert any("no background" in n for n in r.notes)


def test_fber_known_energies():
    img = np.full((30, 40, 40), 4.0)
    head = np.zeros(img.shape, bool)
    head[5:25, 10:30, 10:30] = True
    img[head] = 100.0
    assert image_quality(img, head).metrics["FBER"] == pytest.approx(100.0 ** 2 / 4.0 ** 2)
    # with Gaussian background noise: median of sigma^2 chi2(1) = 0.4549 sigma^2
    rng = np.random.default_rng(2)
    noisy = np.where(head, 100.0, 0.0) + np.where(head, 0.0, rng.normal(0, SIGMA, img.shape))
    assert image_quality(noisy, head).metrics["FBER"] == pytest.approx(100.0 ** 2 / (0.45494 * SIGMA ** 2), rel=0.05)


def test_efc_constant_random_and_concentrated():
    assert efc(np.full((10, 10, 10), 7.0)) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    uniform = efc(rng.uniform(0, 1, (10, 10, 10)))
    spiky = np.zeros((10, 10, 10))
    spiky[5, 5, 5] = 1.0
    assert efc(spiky) == pytest.approx(0.0, abs=1e-12)
    sparse = rng.exponential(1.0, (10, 10, 10)) ** 4
    # uniform on (0, 1): sum x^2 ~ N/3, sum x ~ N/2, sum x ln x ~ -N/4
    n = 1000
    b = math.sqrt(n / 3)
    expected = (-n / 4 - (n / 2) * math.log(b)) / b / (math.sqrt(n) * math.log(1 / math.sqrt(n)))
    assert uniform == pytest.approx(expected, rel=0.01) and uniform < 1.0
    assert efc(sparse) < uniform          # energy concentrated in fewer voxels: lower entropy
    assert efc(np.zeros((4, 4, 4))) is None


def test_psnr_noise_free_is_undefined_and_zero_background_noted():
    img = np.zeros((30, 40, 40))
    head = np.zeros(img.shape, bool)
    head[5:25, 10:30, 10:30] = True
    img[head] = 50.0
    r = image_quality(img, head)
    # the median filter rounds the box's corners: that is the only "noise" left
    assert r.metrics["PSNR"] > 10
    assert image_quality(np.full(img.shape, 50.0), np.ones(img.shape, bool)).metrics["PSNR"] is None
    assert r.metrics["SNR1"] is None and r.metrics["FBER"] is None   # skull-stripped-like zero background
    assert any("exactly zero" in n for n in r.notes)
    assert r.metrics["SNR3"] is None      # patch has no spread: division by zero -> None, not inf


def test_masks_on_another_grid_are_refused():
    with pytest.raises(ValueError, match="not on the image grid"):
        image_quality(np.zeros((10, 10, 10)), np.ones((10, 10, 9), bool))


def test_otsu_and_head_mask():
    rng = np.random.default_rng(4)
    v = np.concatenate([rng.normal(10, 2, 5000), rng.normal(50, 2, 5000)])
    assert 18 < otsu_threshold(v) < 42
    img, head = two_class_phantom()
    derived = head_mask_from_image(np.abs(img))
    assert (derived & head).sum() / head.sum() > 0.98 and (derived & ~head).sum() / head.sum() < 0.02
    # without masks: the derived head; |Gaussian| background has std sigma * sqrt(1 - 2/pi)
    m = image_quality(np.abs(img)).metrics
    assert m["SNR2"] == pytest.approx(MU_HIGH / (math.sqrt(1 - 2 / math.pi) * SIGMA), rel=0.06)


@needs_data(DATA / "tcga-du-7294" / "flair.nii.gz")
def test_real_skull_stripped_series():
    flair = sitk.ReadImage(str(DATA / "tcga-du-7294" / "flair.nii.gz"), sitk.sitkFloat32)[:, :, 50:110]
    brain = sitk.GetArrayFromImage(flair) > 0
    r = image_quality(flair, brain, brain)
    m = r.metrics
    # published BraTS-style data is skull-stripped: zero background -> noise metrics undefined, said so
    assert m["SNR1"] is None and m["SNR2"] is None and m["FBER"] is None
    assert m["SNR4"] is None and m["CNR"] is None and m["CJV"] is None   # a zero patch measures the masking
    assert any("exactly zero" in n for n in r.notes)
    for k in ("MEAN", "CV", "CPP", "PSNR", "SNR3", "CVP", "EFC", "CNR_TISSUE", "CJV_TISSUE"):
        assert m[k] is not None and np.isfinite(m[k]), k
    assert 0 < m["EFC"] < 1 and 0 < m["CJV_TISSUE"] < 2 and m["PSNR"] > 10


# --------------------------------------------------------------------------- history

def test_robust_z_needs_twenty_studies():
    rng = np.random.default_rng(5)
    history = list(rng.normal(30.0, 2.0, 19))
    assert robust_z(20.0, history) is None
    history.append(30.0)
    z = robust_z(20.0, history)
    h = np.asarray(history)
    med = np.median(h)
    assert z == pytest.approx((20.0 - med) / (1.4826 * np.median(np.abs(h - med))))
    assert z < -3.5


def test_outlier_words_and_direction():
    history = [30.0 + 0.5 * ((i % 7) - 3) for i in range(40)]   # median 30, MAD 1
    c = compare_to_history("SNR2", 30 - 4.2 * 1.4826, history, series="FLAIR")
    assert c.outlier and c.worse and c.z == pytest.approx(-4.2, abs=0.01)
    assert c.words.startswith("FLAIR SNR2 far below this scanner's usual (z = -4.2")
    assert "noise" in c.words
    up = compare_to_history("SNR2", 40.0, history, series="FLAIR")
    assert up.outlier and up.worse is False and "far above" in up.words
    assert compare_to_history("CJV", 40.0, history, series="T1").worse is True   # CJV: higher is worse
    ok = compare_to_history("SNR2", 31.0, history, series="FLAIR")
    assert not ok.outlier and ok.words is None
    few = compare_to_history("SNR2", 0.0, history[:10], series="FLAIR")
    assert few.z is None and not few.outlier and few.n_history == 10


def test_constant_history_falls_back_or_is_undefined():
    assert robust_z(5.0, [3.0] * 25) is None                      # no spread at all
    h = [3.0] * 15 + [4.0] * 10                                   # MAD 0, mean abs deviation 0.4
    assert robust_z(5.0, h) == pytest.approx(2.0 / (1.2533 * 0.4))


def test_compare_all_metrics_flags():
    hist = {"SNR1": [10.0 + 0.1 * (i % 5) for i in range(25)], "EFC": [0.5 + 0.001 * (i % 5) for i in range(25)]}
    comps, flags = compare_metrics_to_history({"SNR1": 2.0, "EFC": 0.501, "CJV": 1.0}, hist, series="T2")
    assert comps["CJV"].z is None and comps["EFC"].outlier is False
    assert flags == [f"iqm_outlier: {comps['SNR1'].words}"] and "T2 SNR1 far below" in flags[0]


def _rician(clean: np.ndarray, sigma: float, rng) -> np.ndarray:
    """Magnitude of the clean image plus complex Gaussian noise (sigma per channel)."""
    return np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))


@needs_data(DATA / "tcga-du-7294" / "flair.nii.gz")
def test_real_flair_with_scanner_noise_and_history():
    """A slab of the real FLAIR given Rician background noise like an unmasked
    scanner series: SNR follows the noise, and a noisier study is called out
    against a history of 20 ordinary ones."""
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "tcga-du-7294" / "flair.nii.gz"), sitk.sitkFloat32))
    clean = flair[74:82, 45:195, 45:195].astype(np.float64)      # 8 axial slices through the tumour
    head = clean > 0
    rng = np.random.default_rng(7)
    sigma0 = 8.0
    r = image_quality(_rician(clean, sigma0, rng), head, head)
    m = r.metrics
    assert not r.notes
    # background of a magnitude image: Rayleigh, std = sqrt(2 - pi/2) sigma
    rayleigh_sd = math.sqrt(2 - math.pi / 2) * sigma0
    z, y, x = r.details["foreground_patch_centre_zyx"]
    patch_mean = clean[z - 2:z + 3, y - 2:y + 3, x - 2:x + 3].mean()   # noise-free signal of that patch
    assert patch_mean > np.percentile(clean[head], 95)          # the brightest patch: tumour/edema
    assert m["SNR2"] == pytest.approx(patch_mean / rayleigh_sd, rel=0.05)
    assert m["SNR4"] == pytest.approx(m["SNR2"], rel=0.2)
    assert m["FBER"] > 100 and 0 < m["CJV"] < 1
    history = [image_quality(_rician(clean, sigma0 * s, rng), head, head).metrics["SNR2"]
               for s in np.linspace(0.9, 1.1, 20)]
    noisy = image_quality(_rician(clean, 2 * sigma0, rng), head, head).metrics
    assert noisy["SNR2"] == pytest.approx(m["SNR2"] / 2, rel=0.05)
    c = compare_to_history("SNR2", noisy["SNR2"], history, series="FLAIR")
    assert c.outlier and c.worse and c.z < -3.5
    assert c.words.startswith("FLAIR SNR2 far below this scanner's usual (z = -")
    assert not compare_to_history("SNR2", m["SNR2"], history, series="FLAIR").outlier


def test_median_square_and_efc_match_their_definitions():
    from brainline.pipelines.image_qc import _median_square
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 1000, 1001):
        x = rng.normal(0, 3, n)
        assert _median_square(x) == pytest.approx(float(np.median(np.abs(x) ** 2)), rel=1e-12)
    x = np.clip(rng.normal(50, 20, (20, 30, 30)), -5, None)
    p = np.clip(x, 0, None).ravel() / math.sqrt(float((np.clip(x, 0, None) ** 2).sum()))
    nz = p[p > 0]
    e_max = math.sqrt(p.size) * math.log(1 / math.sqrt(p.size))
    assert efc(x) == pytest.approx(float((nz * np.log(nz)).sum()) / e_max, rel=1e-6)
