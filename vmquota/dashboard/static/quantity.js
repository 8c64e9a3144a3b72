// Kubernetes quantities ("500m", "2", "1.5Gi", "10G", "1e3") as numbers of base units, for ratios and sorting only:
// the page always shows the API's own strings, so no rounding here ever reaches a number a user reads.
const SUFFIXES = {
  "": 1, m: 1e-3, k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15, E: 1e18,
  Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50, Ei: 2 ** 60,
};
const PATTERN = /^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?)$/;

export function parse(text) {
  const m = PATTERN.exec(String(text ?? "").trim());
  if (!m) return NaN;
  return Number(m[1] + (m[2] || "")) * SUFFIXES[m[3] || ""];
}

// used / hard in percent; a hard of 0 is full as soon as anything is used.
export function percent(used, hard) {
  const u = parse(used), h = parse(hard);
  if (Number.isNaN(u) || Number.isNaN(h)) return NaN;
  if (h === 0) return u > 0 ? Infinity : 0;
  return (u / h) * 100;
}

// A share in whole percent, rounded half to even as `vmquota top` (Python's Decimal) writes it: 12.5 % is "12%".
export function percentText(pct) {
  if (!Number.isFinite(pct)) return "–";
  const floor = Math.floor(pct);
  const rounded = Math.abs(pct - floor - 0.5) < 1e-9 ? (floor % 2 === 0 ? floor : floor + 1) : Math.round(pct);
  return `${rounded}%`;
}
