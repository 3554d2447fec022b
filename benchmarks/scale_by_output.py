"""How much activation scales chosen by their effect on the model output could give (issue 11
part 3), measured before building it: for each activation QuantizeLinear of an FP8 model written by
the real-model suite, try its power-of-two scale x2 and /2 and keep a change when the model
outputs' noise (the worst output's snr, on the first 8 calibration samples) falls by 0.5% or more;
two rounds over all of them; then score on the suite's evaluation data. Each tensor's own-loss
search chose the starting scales.

    python benchmarks/scale_by_output.py efficientnet_lite0 <workdir>/efficientnet_lite0/out_v_quantize.onnx \
        <workdir>/efficientnet_lite0/calib.npz

(<workdir>: a `real_models.py --keep` working directory.) Prints the noise and the task metric
before and after, and the scales it changed; results/scale_by_output.md holds a run.
"""
import sys, time, json
from pathlib import Path
import numpy as np, onnx
from onnx import numpy_helper
sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models_zoo as zoo
import onnxruntime as ort
ort.set_default_logger_severity(3)

name, fp8_path, calib = sys.argv[1], sys.argv[2], sys.argv[3]
spec = zoo.BY_NAME[name]
model_path = spec.build(zoo.default_cache_dir())
data = spec.data(model_path)
ref_eval = spec.run_eval(zoo.make_session(model_path), data.evaluation)
m = onnx.load(fp8_path)
inits = {t.name: t for t in m.graph.initializer}
# give each activation QuantizeLinear (and the DequantizeLinears reading its output) its own scale
consumers = {}
for n in m.graph.node:
    for i in n.input: consumers.setdefault(i, []).append(n)
acts = []
for n in m.graph.node:
    if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
        s = inits[n.input[1]]
        new = numpy_helper.from_array(numpy_helper.to_array(s).copy(), f"{n.output[0]}__scale")
        m.graph.initializer.append(new)
        n.input[1] = new.name
        for d in consumers.get(n.output[0], []):
            if d.op_type == "DequantizeLinear": d.input[1] = new.name
        acts.append(new.name)
inits = {t.name: t for t in m.graph.initializer}
cal = dict(np.load(calib)); names = list(cal)
feeds = [{k: cal[k][i:i + 1] for k in names} for i in range(8)]
fs = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
ref = [fs.run(None, f) for f in feeds]
def noise(model):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    num = den = 0.0
    worst = 0.0
    outs = [s.run(None, f) for f in feeds]
    for j in range(len(ref[0])):
        e = sum(float(np.sum((o[j].astype(np.float64) - r[j]) ** 2)) for o, r in zip(outs, ref))
        x = sum(float(np.sum(r[j].astype(np.float64) ** 2)) for r in ref)
        worst = max(worst, e / x)
    return worst
def score(model):
    p = str(Path(fp8_path).with_suffix(".scale_by_output.onnx")); onnx.save(model, p)
    test = spec.run_eval(zoo.make_session(p), data.evaluation)
    return spec.metric(ref_eval, test)
t0 = time.time()
base = noise(m); print("acts", len(acts), "all-FP8 snr", base, "eval", score(m), flush=True)
best = base; changed = {}
for rnd in range(2):
    for a in acts:
        v = numpy_helper.to_array(inits[a])
        for f in (2.0, 0.5):
            inits[a].CopyFrom(numpy_helper.from_array((v * f).astype(v.dtype), a))
            n = noise(m)
            if n < best * 0.995:
                best = n; changed[a] = changed.get(a, 1.0) * f; v = v * f; break
            inits[a].CopyFrom(numpy_helper.from_array(v.astype(v.dtype), a))
    print("round", rnd, "snr", best, "changed", len(changed), round(time.time() - t0), "s", flush=True)
print("eval after", score(m), json.dumps(changed))
