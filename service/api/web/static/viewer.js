/* BrainLine review viewer: the co-registered sequences of one job with the
 * segmentation overlay, drawn on <canvas> from 8-bit volumes that the server
 * sends once per sequence (GET <base>/volume/<name>, gzip'ed bytes in
 * z, y, x order on the patient's LPS axes; GET <base>/volumes.json says the
 * shape and spacing). Plain JavaScript, nothing from another host.
 *
 * window.brainlineViewer exposes the state and a few calls for tests:
 * ready, loadMs (ms from navigation start to the first complete frame),
 * frames (frames drawn), step(n), setPlane(p), setOpacity(a), setLabel(v, on),
 * goTo([z, y, x]), drawNow(), pixel(role, x, y).
 */
(function () {
  'use strict';
  const root = document.getElementById('viewer');
  const LABEL_RGB = { 1: [255, 48, 48], 2: [40, 220, 40], 3: [255, 220, 0] };
  const viewer = window.brainlineViewer = {
    ready: false, loadMs: null, frames: 0, error: null,
    state: { plane: 'axial', pos: [0, 0, 0], opacity: 0.45, show: { 1: true, 2: true, 3: true } },
  };
  const state = viewer.state;
  let meta = null;
  let seg = null;
  const vols = {};
  const panels = [];
  let lutGray = null;
  let lutLabel = null;
  let pending = false;

  function csrfToken() {
    const m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.content : '';
  }

  /* ---------------------------------------------------------------- identity */
  const idButton = document.getElementById('show-identity');
  if (idButton) {
    idButton.addEventListener('click', async function () {
      const box = document.getElementById('identity');
      idButton.disabled = true;
      try {
        const r = await fetch(idButton.dataset.url, {
          method: 'POST', credentials: 'same-origin', cache: 'no-store',
          headers: { 'X-CSRF-Token': csrfToken(), 'Content-Type': 'application/json' }, body: '{}',
        });
        const data = await r.json();
        box.textContent = '';
        if (!r.ok) {
          box.textContent = data.detail || ('error ' + r.status);
        } else {
          const rows = [['Name', data.patient_name], ['Patient ID', data.patient_id + (data.issuer ? ' (' + data.issuer + ')' : '')],
            ['Born', data.birth_date], ['Sex', data.sex], ['Accession', data.accession_number]];
          for (const [k, v] of rows) {
            const line = document.createElement('div');
            const b = document.createElement('b');
            b.textContent = k + ': ';
            line.appendChild(b);
            line.appendChild(document.createTextNode(v || '-'));
            box.appendChild(line);
          }
          const hide = document.createElement('button');
          hide.type = 'button';
          hide.textContent = 'Hide';
          hide.addEventListener('click', function () { box.hidden = true; box.textContent = ''; idButton.disabled = false; });
          box.appendChild(hide);
        }
        box.hidden = false;
      } catch (e) {
        box.textContent = 'the identity could not be fetched: ' + e;
        box.hidden = false;
        idButton.disabled = false;
      }
    });
  }

  if (!root) return;
  const base = root.dataset.base;

  /* ---------------------------------------------------------------- geometry */
  function geom(plane) {
    const [nz, ny, nx] = meta.shape;
    const [sz, sy, sx] = meta.spacing;
    if (plane === 'axial') return { w: nx, h: ny, pw: sx, ph: sy, axis: 0, n: nz };
    if (plane === 'coronal') return { w: nx, h: nz, pw: sx, ph: sz, axis: 1, n: ny };
    return { w: ny, h: nz, pw: sy, ph: sz, axis: 2, n: nx };
  }

  /* voxel (z, y, x) of image pixel (col c, row r) in the current plane */
  function voxelOf(plane, c, r) {
    const [nz] = meta.shape;
    const p = state.pos.slice();
    if (plane === 'axial') { p[1] = r; p[2] = c; } else if (plane === 'coronal') { p[0] = nz - 1 - r; p[2] = c; } else { p[0] = nz - 1 - r; p[1] = c; }
    return p;
  }

  /* ------------------------------------------------------------------ colour */
  function buildLuts() {
    lutGray = new Uint32Array(256);
    for (let g = 0; g < 256; g++) lutGray[g] = (0xff000000 | (g << 16) | (g << 8) | g) >>> 0;
    lutLabel = [null];
    const a = state.opacity;
    for (let v = 1; v <= 3; v++) {
      const t = new Uint32Array(256);
      const [cr, cg, cb] = LABEL_RGB[v];
      for (let g = 0; g < 256; g++) {
        if (!state.show[v] || a <= 0) { t[g] = lutGray[g]; continue; }
        const r = Math.round(g * (1 - a) + cr * a), gg = Math.round(g * (1 - a) + cg * a), b = Math.round(g * (1 - a) + cb * a);
        t[g] = (0xff000000 | (b << 16) | (gg << 8) | r) >>> 0;
      }
      lutLabel.push(t);
    }
  }

  /* ----------------------------------------------------------------- drawing */
  function renderSlice(panel, g) {
    const vol = vols[panel.role];
    const [nz, ny, nx] = meta.shape;
    const k = state.pos[g.axis];
    if (panel.off.width !== g.w || panel.off.height !== g.h) {
      panel.off.width = g.w; panel.off.height = g.h;
      panel.image = panel.offCtx.createImageData(g.w, g.h);
      panel.pix = new Uint32Array(panel.image.data.buffer);
    }
    const out = panel.pix;
    const gray = lutGray, lab = lutLabel;
    let i = 0;
    if (g.axis === 0) {
      const start = k * ny * nx;
      for (let j = 0; j < g.w * g.h; j++) {
        const v = vol[start + j], l = seg[start + j];
        out[j] = l ? lab[l][v] : gray[v];
      }
    } else if (g.axis === 1) {
      for (let r = 0; r < g.h; r++) {
        const row = (nz - 1 - r) * ny * nx + k * nx;
        for (let c = 0; c < g.w; c++, i++) {
          const v = vol[row + c], l = seg[row + c];
          out[i] = l ? lab[l][v] : gray[v];
        }
      }
    } else {
      for (let r = 0; r < g.h; r++) {
        const row = (nz - 1 - r) * ny * nx + k;
        for (let c = 0; c < g.w; c++, i++) {
          const idx = row + c * nx, v = vol[idx], l = seg[idx];
          out[i] = l ? lab[l][v] : gray[v];
        }
      }
    }
    panel.offCtx.putImageData(panel.image, 0, 0);
    const cv = panel.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.max(1, Math.round(cv.clientWidth * dpr)), ch = Math.max(1, Math.round(cv.clientHeight * dpr));
    if (cv.width !== cw || cv.height !== ch) { cv.width = cw; cv.height = ch; }
    const ctx = panel.ctx;
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, cw, ch);
    const scale = Math.min(cw / (g.w * g.pw), ch / (g.h * g.ph));
    const dw = g.w * g.pw * scale, dh = g.h * g.ph * scale;
    const dx = (cw - dw) / 2, dy = (ch - dh) / 2;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(panel.off, 0, 0, g.w, g.h, dx, dy, dw, dh);
    panel.rect = { dx: dx / dpr, dy: dy / dpr, sx: dw / dpr / g.w, sy: dh / dpr / g.h };
    const mark = g.axis === 2 ? 'A' : 'R';
    if (panel.side.textContent !== mark) panel.side.textContent = mark;
  }

  function drawNow() {
    pending = false;
    if (!meta) return;
    const g = geom(state.plane);
    for (const p of panels) renderSlice(p, g);
    const k = state.pos[g.axis];
    const slider = document.getElementById('slice');
    if (Number(slider.max) !== g.n - 1) slider.max = String(g.n - 1);
    if (Number(slider.value) !== k) slider.value = String(k);
    document.getElementById('slice-out').textContent = (k + 1) + ' / ' + g.n;
    viewer.frames += 1;
  }

  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(drawNow); }
  }

  /* ---------------------------------------------------------------- controls */
  function clampPos() {
    for (let a = 0; a < 3; a++) state.pos[a] = Math.min(Math.max(0, state.pos[a] | 0), meta.shape[a] - 1);
  }

  function step(n) {
    const g = geom(state.plane);
    state.pos[g.axis] = Math.min(Math.max(0, state.pos[g.axis] + n), g.n - 1);
    schedule();
  }

  function setPlane(plane) {
    state.plane = plane;
    for (const b of document.querySelectorAll('button.plane')) b.classList.toggle('here', b.dataset.plane === plane);
    schedule();
  }

  function setOpacity(a) {
    state.opacity = Math.min(Math.max(0, a), 1);
    document.getElementById('opacity').value = String(Math.round(state.opacity * 100));
    document.getElementById('opacity-out').textContent = Math.round(state.opacity * 100) + ' %';
    buildLuts();
    schedule();
  }

  function setLabel(v, on) {
    state.show[v] = !!on;
    const box = document.getElementById('label-' + v);
    if (box) box.checked = !!on;
    buildLuts();
    schedule();
  }

  function goTo(pos) {
    if (!pos) return;
    state.pos = pos.slice(0, 3);
    clampPos();
    schedule();
  }

  function wire() {
    document.getElementById('slice').addEventListener('input', function (e) {
      const g = geom(state.plane);
      state.pos[g.axis] = Number(e.target.value);
      schedule();
    });
    document.getElementById('opacity').addEventListener('input', function (e) { setOpacity(Number(e.target.value) / 100); });
    for (const box of document.querySelectorAll('input[data-label]')) {
      box.addEventListener('change', function () { setLabel(Number(box.dataset.label), box.checked); });
    }
    for (const b of document.querySelectorAll('button.plane')) b.addEventListener('click', function () { setPlane(b.dataset.plane); });
    for (const b of document.querySelectorAll('button.goto')) {
      b.addEventListener('click', function () {
        const c = meta.components.find(function (x) { return String(x.index) === b.dataset.component; });
        if (c && c.position) goTo(c.position);
      });
    }
    document.addEventListener('keydown', function (e) {
      const t = e.target;
      if (t && (t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || (t.tagName === 'INPUT' && t.type !== 'range' && t.type !== 'checkbox'))) return;
      const moves = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 5, PageDown: -5 };
      if (e.key in moves) { e.preventDefault(); step(moves[e.key]); } else if (e.key === 'Home' || e.key === 'End') {
        e.preventDefault();
        const g = geom(state.plane);
        state.pos[g.axis] = e.key === 'Home' ? 0 : g.n - 1;
        schedule();
      }
    });
    window.addEventListener('resize', schedule);
  }

  function makePanels() {
    const host = document.getElementById('panels');
    host.textContent = '';
    for (const role of meta.roles) {
      const fig = document.createElement('figure');
      fig.className = 'panel';
      fig.dataset.role = role;
      const canvas = document.createElement('canvas');
      const cap = document.createElement('figcaption');
      cap.textContent = meta.role_names[role] || role;
      const side = document.createElement('span');
      side.className = 'side-r';
      fig.appendChild(canvas); fig.appendChild(cap); fig.appendChild(side);
      host.appendChild(fig);
      const off = document.createElement('canvas');
      const panel = { role, canvas, ctx: canvas.getContext('2d'), off, offCtx: off.getContext('2d'), image: null, pix: null, rect: null, side };
      canvas.addEventListener('wheel', function (e) {
        e.preventDefault();
        if (e.deltaY) step(e.deltaY > 0 ? 1 : -1);
      }, { passive: false });
      canvas.addEventListener('click', function (e) {
        const rc = canvas.getBoundingClientRect(), R = panel.rect;
        if (!R) return;
        const c = Math.floor((e.clientX - rc.left - R.dx) / R.sx), r = Math.floor((e.clientY - rc.top - R.dy) / R.sy);
        const g = geom(state.plane);
        if (c < 0 || r < 0 || c >= g.w || r >= g.h) return;
        state.pos = voxelOf(state.plane, c, r);
        clampPos();
        schedule();
      });
      panels.push(panel);
    }
  }

  /* ---------------------------------------------------------------- loading */
  async function fetchOk(url, how) {
    const r = await fetch(url, { credentials: 'same-origin', cache: 'no-store' });
    if (!r.ok) {
      let why = 'HTTP ' + r.status;
      try { why = (await r.json()).detail || why; } catch (e) { /* not JSON */ }
      throw new Error(why);
    }
    return how === 'json' ? r.json() : r.arrayBuffer();
  }

  async function load() {
    const status = document.getElementById('viewer-status');
    try {
      meta = await fetchOk(base + '/volumes.json', 'json');
      const names = meta.roles.concat(['seg']);
      const bufs = await Promise.all(names.map(function (n) { return fetchOk(base + '/volume/' + n, 'bytes'); }));
      const size = meta.shape[0] * meta.shape[1] * meta.shape[2];
      names.forEach(function (n, i) {
        const a = new Uint8Array(bufs[i]);
        if (a.length !== size) throw new Error(n + ': ' + a.length + ' bytes, expected ' + size);
        if (n === 'seg') seg = a; else vols[n] = a;
      });
      state.pos = meta.start.slice();
      clampPos();
      buildLuts();
      makePanels();
      wire();
      drawNow();
      viewer.ready = true;
      viewer.loadMs = performance.now();
      viewer.meta = meta;
      root.dataset.ready = '1';
    } catch (e) {
      viewer.error = String(e.message || e);
      if (status) status.textContent = 'The images could not be loaded: ' + viewer.error;
    }
  }

  viewer.step = step;
  viewer.setPlane = setPlane;
  viewer.setOpacity = setOpacity;
  viewer.setLabel = setLabel;
  viewer.goTo = goTo;
  viewer.drawNow = drawNow;
  viewer.geom = function () { return geom(state.plane); };
  /* RGBA of image pixel (c, r) of a panel's current slice (tests) */
  viewer.pixel = function (role, c, r) {
    const p = panels.find(function (x) { return x.role === role; });
    const g = geom(state.plane);
    const d = p.image.data, i = 4 * (r * g.w + c);
    return [d[i], d[i + 1], d[i + 2]];
  };
  /* labels present in the current slice (tests) */
  viewer.sliceLabels = function () {
    const g = geom(state.plane), out = { 1: 0, 2: 0, 3: 0 };
    const [nz, ny, nx] = meta.shape, k = state.pos[g.axis];
    for (let r = 0; r < g.h; r++) for (let c = 0; c < g.w; c++) {
      let idx;
      if (g.axis === 0) idx = k * ny * nx + r * nx + c;
      else if (g.axis === 1) idx = (nz - 1 - r) * ny * nx + k * nx + c;
      else idx = (nz - 1 - r) * ny * nx + c * nx + k;
      if (seg[idx]) out[seg[idx]] += 1;
    }
    return out;
  };
  load();
})();
