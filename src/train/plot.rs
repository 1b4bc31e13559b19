//! `RUN/loss.svg`: train and eval loss against step, as a small standalone SVG a person can open.

use std::fmt::Write;

/// Renders loss curves. `train` and `eval` are `(step, loss)` points.
pub fn loss_svg(train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all = train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)]| {
        pts.iter()
            .filter(|p| p.1.is_finite())
            .enumerate()
            .map(|(i, &(x, y))| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, sx(x), sy(y)))
            .collect::<String>()
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#444"/>
<text x="{pad}" y="{ty}">step {x0:.0}</text><text x="{r}" y="{ty}" text-anchor="end">step {x1:.0}</text>
<text x="{lx}" y="{b}" text-anchor="end">{y0:.3}</text><text x="{lx}" y="{pad}" text-anchor="end">{y1:.3}</text>
<path d="{tr}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
<path d="{ev}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>
<text x="{r}" y="20" text-anchor="end"><tspan fill="#1f77b4">train loss</tspan>  <tspan fill="#d62728">eval loss</tspan></text>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        ty = h - pad + 18.0,
        lx = pad - 4.0,
        tr = line(train),
        ev = line(eval),
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_both_curves() {
        let s = super::loss_svg(&[(1.0, 3.0), (2.0, 2.0), (3.0, 1.5)], &[(3.0, 1.8)]);
        assert!(s.starts_with("<svg") && s.contains("M48.0,") && s.contains("eval loss"));
    }
}
