"""Registration QC benchmark: false alarms on correct registrations, detection
of deliberately wrong ones, on clinical-like acquisitions of the shared cases.

Acquisitions (made here from the 1 mm, co-registered shared volumes; physical
space LPS mm is kept, so the true fixed->moving transform is the identity):

* T1c, the fixed image: 3D 1 mm on its own slightly tilted grid in a
  head-sized field of view, or (every third case) 2D axial 5 mm slices.
* T1, T2, FLAIR: each on its own tilted grid (pitch 8-20 deg, yaw and roll
  up to +-5 deg), 2D slices of 4-6 mm with a slice profile (weighted average
  of sub-slices across the slice thickness), in-plane 0.8-1.0 mm, field of
  view and slab of their own, the vertex cut by 10-20 mm on some series, a
  smooth multiplicative bias field, scanner-like intensity scaling and offset;
  one role acquired sagittal or coronal; plus a 1 mm 3D FLAIR.
* Every other case "skull-on": a crude head built around the brain (CSF rim,
  dark bone, bright scalp, sequence-dependent contrasts) and Rician-like
  background noise, so that the background is not zero.

For each moving series: ``register()`` (its error vs the truth: mean / max
displacement over the brain, mm), its flags (should be none), then
``registration_quality()`` on wrong transforms: the result composed with a
rotation of ``--deg`` about a random axis through the brain centre, or a
translation of ``--mm`` along a random direction (``--wrong`` of each).

Calibration cases (used to choose the thresholds) and held-out cases are
reported separately::

    python bench/registration_qc.py [--split tune|heldout|all] [--wrong 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from brainline.pipelines.registration import (  # noqa: E402
    RegistrationConfig,
    RegistrationError,
    register,
    registration_quality,
)

DATA = REPO_ROOT.parent / "shared" / "data"
TUNE = ["2013_11", "CBICA_ABM", "TCIA01_201", "TCIA02_135", "TCIA03_265", "TCIA10_628"]
HELDOUT = ["2013_20", "CBICA_ALU", "CBICA_AME", "TCIA01_425", "TCIA02_606", "TCIA13_623", "tcga-du-7294"]
ROLES = ("t1c", "t1", "t2", "flair")
LABEL = {"t1c": "T1c", "t1": "T1", "t2": "T2", "flair": "FLAIR"}


# ---------------------------------------------------------------------------
# clinical-like acquisitions
# ---------------------------------------------------------------------------


def load_case(case: str) -> dict[str, sitk.Image]:
    """The four 1 mm volumes of a case (float32)."""
    if case == "tcga-du-7294":
        files = {r: DATA / case / f"{r}.nii.gz" for r in ROLES}
    else:
        d = DATA / "brats18" / f"Brats18_{case}_1"
        files = {r: d / f"Brats18_{case}_1_{'t1ce' if r == 't1c' else r}.nii.gz" for r in ROLES}
    return {r: sitk.Cast(sitk.ReadImage(str(p)), sitk.sitkFloat32) for r, p in files.items()}


# relative intensities (x median brain value) of CSF rim, bone, scalp/fat
_HEAD = {"t1c": (0.25, 0.05, 1.4), "t1": (0.25, 0.05, 1.5), "t2": (1.6, 0.05, 0.9), "flair": (0.15, 0.05, 1.0)}


def add_skull(images: dict[str, sitk.Image], rng: np.random.Generator) -> dict[str, sitk.Image]:
    """Crude head around the brain: 3 mm CSF, 5 mm bone, 6 mm scalp, built
    from the distance to the brain mask (images padded by 25 mm first)."""
    pad = [25, 25, 25]
    padded = {r: sitk.ConstantPad(im, pad, pad, 0.0) for r, im in images.items()}
    brain = None
    for im in padded.values():
        m = sitk.Cast(im > 0, sitk.sitkUInt8)
        brain = m if brain is None else brain | m
    brain = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(brain, [3, 3, 3]))
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False,
                                                                squaredDistance=False, useImageSpacing=True))
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.normal(0, 1, dist.shape).astype(np.float32)), 2.0))
    texture /= texture.std() + 1e-6
    out = {}
    for r, im in padded.items():
        arr = sitk.GetArrayFromImage(im)
        med = float(np.median(arr[arr > 0]))
        csf, bone, scalp = _HEAD[r]
        head = np.zeros_like(arr)
        head[(dist > 0) & (dist <= 3)] = csf
        head[(dist > 3) & (dist <= 8)] = bone
        head[(dist > 8) & (dist <= 14)] = scalp
        head *= med * (1.0 + 0.1 * texture)
        h = sitk.GetImageFromArray(head.astype(np.float32))
        h.CopyInformation(im)
        h = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(h, 1.0))
        arr = np.where(dist > 0, h, arr).astype(np.float32)
        o = sitk.GetImageFromArray(arr)
        o.CopyInformation(im)
        out[r] = o
    return out


def _rot(axis: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    j, k = [m for m in range(3) if m != axis]
    r = np.eye(3)
    r[j, j], r[j, k], r[k, j], r[k, k] = c, -s, s, c
    return r


# slice plane bases (columns: row direction, column direction, slice normal), LPS
_PLANES = {
    "axial": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
    "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float).T,
    "sagittal": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float).T,
}


def acquire(image: sitk.Image, brain_pts: np.ndarray, rng: np.random.Generator, *, plane: str = "axial",
            inplane_mm: float = 0.9, slice_mm: float = 5.0, pitch_deg: float = 15.0, yaw_deg: float = 0.0,
            roll_deg: float = 0.0, fov_mm: float = 240.0, vertex_cut_mm: float = 0.0,
            profile: bool = True, bias: float = 0.2, scale: float = 1.0, offset: float = 0.0,
            noise: float = 0.0) -> sitk.Image:
    """``image`` as acquired on its own tilted grid.

    pitch about L-R, yaw about S-I, roll about A-P (degrees); slices of
    ``slice_mm`` (2D, slice profile: weighted mean of 5 sub-slices, when
    ``profile``), square in-plane FOV ``fov_mm``, the slab covering the brain
    along the slice normal plus 10 mm, minus ``vertex_cut_mm`` at the top;
    multiplicative bias field ``exp(+-bias)`` varying linearly and
    quadratically over the head; intensities ``scale * x + offset``; Rician
    noise of ``noise`` x median brain value. Returns int16.
    """
    direction = _rot(2, yaw_deg) @ _rot(1, roll_deg) @ _rot(0, pitch_deg) @ _PLANES[plane]
    normal = direction[:, 2]
    centre = brain_pts.mean(axis=0) + rng.normal(0, 4.0, 3)
    proj = (brain_pts - centre) @ normal
    lo, hi = proj.min() - 10.0, proj.max() + 10.0
    # the vertex is the top along +S (z in LPS): cut from the end of the slab that points up
    if vertex_cut_mm > 0:
        if normal[2] >= 0:
            hi = proj.max() - vertex_cut_mm
        else:
            lo = proj.min() + vertex_cut_mm
    n_sl = max(3, int(math.ceil((hi - lo) / slice_mm)))
    n_ip = int(round(fov_mm / inplane_mm))
    sub = 5 if profile and slice_mm > 2.0 else 1
    sub_sp = slice_mm / sub
    half_ip = (n_ip - 1) * inplane_mm / 2.0
    first = lo + 0.5 * sub_sp
    origin = centre + direction @ np.array([-half_ip, -half_ip, first])
    ref = sitk.Image([n_ip, n_ip, n_sl * sub], sitk.sitkFloat32)
    ref.SetSpacing((inplane_mm, inplane_mm, sub_sp))
    ref.SetDirection(tuple(direction.ravel()))
    ref.SetOrigin(tuple(origin))
    fine = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    if sub > 1:
        w = np.array([0.35, 0.8, 1.0, 0.8, 0.35])
        w /= w.sum()
        arr = np.tensordot(fine.reshape(n_sl, sub, n_ip, n_ip), w, axes=([1], [0]))
    else:
        arr = fine
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.SetSpacing((inplane_mm, inplane_mm, slice_mm))
    out.SetDirection(tuple(direction.ravel()))
    out.SetOrigin(tuple(centre + direction @ np.array([-half_ip, -half_ip, lo + 0.5 * slice_mm])))
    # bias field over the physical positions of the voxels
    k, j, i = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    idx = np.stack([i.ravel(), j.ravel(), k.ravel()], 1) * np.array(out.GetSpacing())
    pos = (idx @ direction.T + np.array(out.GetOrigin()) - centre) / 100.0
    g = rng.normal(0, 1, 3)
    g /= np.linalg.norm(g)
    h = rng.normal(0, 1, 3)
    h /= np.linalg.norm(h)
    field = np.exp(bias * (pos @ g) + 0.5 * bias * ((pos @ h) ** 2 - 0.5))
    arr = arr * field.reshape(arr.shape)
    if noise > 0:
        tissue = arr[arr > 0.1 * np.percentile(arr, 99)]
        med = float(np.median(tissue)) if tissue.size else 1.0
        sd = noise * med
        arr = np.sqrt((arr + rng.normal(0, sd, arr.shape)) ** 2 + rng.normal(0, sd, arr.shape) ** 2)
    arr = np.clip(np.round(scale * arr + offset), -32768, 32767).astype(np.int16)
    res = sitk.GetImageFromArray(arr)
    res.CopyInformation(out)
    return res


def brain_points(image: sitk.Image, step: int = 4) -> np.ndarray:
    """Physical points (N x 3) of every ``step``-th brain voxel (image > 0)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(image) > 0)[::step, ::-1].astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ d.T


def make_study(case: str, index: int) -> tuple[sitk.Image, dict[str, sitk.Image], np.ndarray, dict]:
    """(fixed T1c, {moving name: image}, brain points, description)."""
    rng = np.random.default_rng(1000 + index)
    vols = load_case(case)
    pts = brain_points(vols["t1c"])
    skull = index % 2 == 1
    if skull:
        vols = add_skull(vols, rng)
    noise = 0.03 if skull else 0.0
    desc = {"skull": skull}
    if index % 3 == 2:
        fixed = acquire(vols["t1c"], pts, rng, slice_mm=5.0, inplane_mm=0.9, pitch_deg=rng.uniform(8, 20),
                        yaw_deg=rng.uniform(-5, 5), roll_deg=rng.uniform(-5, 5), fov_mm=240, noise=noise,
                        scale=rng.uniform(0.5, 3.0))
        desc["T1c"] = "2D 5 mm"
    else:
        fixed = acquire(vols["t1c"], pts, rng, slice_mm=1.0, inplane_mm=1.0, pitch_deg=rng.uniform(0, 10),
                        yaw_deg=rng.uniform(-3, 3), roll_deg=rng.uniform(-3, 3), fov_mm=256, profile=False,
                        noise=noise, scale=rng.uniform(0.5, 3.0))
        desc["T1c"] = "3D 1 mm"
    moving = {}
    odd_role = ["t1", "t2", "flair"][index % 3]
    odd_plane = "sagittal" if index % 2 == 0 else "coronal"
    for role in ("t1", "t2", "flair"):
        plane = odd_plane if role == odd_role else "axial"
        cut = float(rng.uniform(10, 20)) if (plane == "axial" and rng.random() < 0.6) else 0.0
        kw = dict(plane=plane, inplane_mm=float(rng.uniform(0.8, 1.0)), slice_mm=float(rng.uniform(4, 6)),
                  pitch_deg=float(rng.uniform(8, 20)) if plane == "axial" else float(rng.uniform(-5, 5)),
                  yaw_deg=float(rng.uniform(-5, 5)), roll_deg=float(rng.uniform(-5, 5)),
                  fov_mm=float(rng.uniform(220, 250)), vertex_cut_mm=cut, bias=float(rng.uniform(0.1, 0.3)),
                  scale=float(rng.uniform(0.3, 4.0)), offset=float(rng.uniform(0, 50)), noise=noise)
        name = f"{LABEL[role]} {plane} {kw['slice_mm']:.1f}mm" + (f" cut{cut:.0f}" if cut else "")
        moving[name] = acquire(vols[role], pts, rng, **kw)
    moving["FLAIR 3D 1mm"] = acquire(vols["flair"], pts, rng, slice_mm=1.0, inplane_mm=1.0, profile=False,
                                     pitch_deg=float(rng.uniform(-10, 10)), yaw_deg=float(rng.uniform(-5, 5)),
                                     roll_deg=float(rng.uniform(-5, 5)), fov_mm=250, noise=noise,
                                     bias=0.2, scale=float(rng.uniform(0.3, 4.0)))
    return fixed, moving, pts, desc


# ---------------------------------------------------------------------------
# wrong transforms and errors
# ---------------------------------------------------------------------------


def _affine(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)))
    return np.column_stack([np.asarray(tx.TransformPoint(tuple(e))) - o for e in np.eye(3)]), o


def displacement(tx: sitk.Transform, pts: np.ndarray) -> tuple[float, float]:
    """Mean / max distance (mm) between tx(x) and x over ``pts`` (truth = identity)."""
    a, o = _affine(tx)
    d = np.linalg.norm(pts @ a.T + o - pts, axis=1)
    return float(d.mean()), float(d.max())


def wrong(tx: sitk.Transform, centre: np.ndarray, rng: np.random.Generator, *, deg: float = 0.0,
          mm: float = 0.0) -> sitk.Transform:
    """``tx`` composed with a rotation of ``deg`` about a random axis through
    ``centre`` or a translation of ``mm`` along a random direction (fixed space)."""
    axis = rng.normal(0, 1, 3)
    axis /= np.linalg.norm(axis)
    err = sitk.Euler3DTransform()
    err.SetCenter(tuple(centre))
    if deg:
        v = sitk.VersorRigid3DTransform()
        v.SetCenter(tuple(centre))
        v.SetRotation(tuple(axis), math.radians(deg))
        err.SetMatrix(v.GetMatrix())
    if mm:
        err.SetTranslation(tuple(axis * mm))
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(tx)
    comp.AddTransform(err)  # applied first: x -> err(x) -> tx(err(x))
    a, o = _affine(comp)
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(a.ravel()))
    out.SetTranslation(tuple(o))
    return out


# ---------------------------------------------------------------------------


def run(cases: list[str], n_wrong: int, deg: float, mm: float, cfg: RegistrationConfig,
        verbose: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        index = (TUNE + HELDOUT).index(case)
        fixed, moving, pts, desc = make_study(case, index)
        centre = pts.mean(axis=0)
        rng = np.random.default_rng(77 + index)
        for name, mov in moving.items():
            row = {"case": case, "series": name, "fixed": desc["T1c"], "skull": desc["skull"]}
            t0 = time.perf_counter()
            try:
                res = register(fixed, mov, cfg, moving_name=name.split()[0], fixed_name="T1c")
            except RegistrationError as exc:
                row.update(error=str(exc))
                rows.append(row)
                print(f"{case:12s} {name:28s} REGISTRATION ERROR {exc}")
                continue
            row["register_s"] = round(time.perf_counter() - t0, 2)
            row["error_mean_mm"], row["error_max_mm"] = map(lambda v: round(v, 2), displacement(res.transform, pts))
            row["flags"] = res.flags
            row["quality"] = res.quality
            row["wrong"] = []
            for kind, kw in [("rot", {"deg": deg}), ("shift", {"mm": mm})]:
                for _ in range(n_wrong):
                    w = wrong(res.transform, centre, rng, **kw)
                    t1 = time.perf_counter()
                    q, flags = registration_quality(fixed, mov, w, cfg, fixed_name="T1c",
                                                    moving_name=name.split()[0])
                    row["wrong"].append({"kind": kind, "error_mean_mm": round(displacement(w, pts)[0], 2),
                                         "gain": q.get("similarity_gain"), "dice": q.get("foreground_dice"),
                                         "flags": flags, "qc_s": round(time.perf_counter() - t1, 3)})
            rows.append(row)
            if verbose:
                det = "".join("X" if w["flags"] else "." for w in row["wrong"])
                print(f"{case:12s} {name:28s} {desc['T1c']:8s} skull={int(desc['skull'])} "
                      f"err {row['error_mean_mm']:5.2f}/{row['error_max_mm']:5.2f} mm  "
                      f"gain {res.quality.get('similarity_gain')!s:>8s} "
                      f"dice {res.quality.get('foreground_dice')!s:>7s} "
                      f"flags {len(res.flags)} wrong [{det}] gains "
                      f"{' '.join(str(w['gain']) for w in row['wrong'])}  reg {row['register_s']} s "
                      f"qc {res.quality.get('elapsed_s')} s", flush=True)
                for f in res.flags:
                    print("      ", f)
    return rows


def summarise(rows: list[dict], title: str) -> dict:
    ok = [r for r in rows if "error" not in r]
    correct = [r for r in ok if r["error_max_mm"] < 2.5]
    false_alarms = [r for r in correct if r["flags"]]
    wrongs = [w for r in ok for w in r["wrong"]]
    by_kind = {}
    for kind in ("rot", "shift"):
        ws = [w for w in wrongs if w["kind"] == kind]
        by_kind[kind] = (sum(1 for w in ws if w["flags"]), len(ws))
    qc_times = [w["qc_s"] for w in wrongs]
    summary = {
        "registrations": len(rows), "registration_errors": len(rows) - len(ok),
        "correct": len(correct), "false_alarms": len(false_alarms),
        "false_alarm_rate": len(false_alarms) / max(1, len(correct)),
        "detected_rot": by_kind["rot"], "detected_shift": by_kind["shift"],
        "detection_rate": sum(d for d, _ in by_kind.values()) / max(1, len(wrongs)),
        "qc_s_median": float(np.median(qc_times)) if qc_times else None,
        "register_s_median": float(np.median([r["register_s"] for r in ok])) if ok else None,
    }
    print(f"\n== {title}: {summary['correct']}/{summary['registrations']} registrations correct "
          f"(max error < 2.5 mm), false alarms {summary['false_alarms']} "
          f"({100 * summary['false_alarm_rate']:.1f}%), detected: rotation {by_kind['rot'][0]}/{by_kind['rot'][1]}, "
          f"shift {by_kind['shift'][0]}/{by_kind['shift'][1]} ({100 * summary['detection_rate']:.1f}%), "
          f"QC {summary['qc_s_median']:.2f} s median, register {summary['register_s_median']:.1f} s median")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("tune", "heldout", "all"), default="heldout")
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--wrong", type=int, default=3, help="wrong transforms of each kind per registration")
    ap.add_argument("--deg", type=float, default=5.0)
    ap.add_argument("--mm", type=float, default=5.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
    cfg = RegistrationConfig()
    splits = {"tune": [("tune", TUNE)], "heldout": [("held-out", HELDOUT)],
              "all": [("tune", TUNE), ("held-out", HELDOUT)]}[args.split]
    if args.cases:
        splits = [("selected", args.cases)]
    out = {}
    for title, cases in splits:
        rows = run(cases, args.wrong, args.deg, args.mm, cfg)
        out[title] = {"rows": rows, "summary": summarise(rows, title)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    s = [v["summary"] for v in out.values()]
    return 1 if any(x["false_alarms"] for x in s) else 0


if __name__ == "__main__":
    sys.exit(main())
