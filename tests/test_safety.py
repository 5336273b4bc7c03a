"""Inputs that would change the algorithm without a sign are refused (or made harmless) with a clear error: a
parameter listed twice, non-finite hyper-parameters, an ``eps`` both fastasam and the base optimizer take, gradients
already present when ``step(closure)`` begins, a second pass that raises inside ``step(closure)``, and the state of
another base optimizer class in ``load_state_dict``. Where the backend matters, every backend that runs here."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import FAST_CASES, soup_loss

import fastasam
from fastasam import compat

CASES = [("reference", "cpu"), *FAST_CASES]
IDS = [f"{b}-{d}" for b, d in CASES]
ALL = pytest.mark.parametrize("backend,device", CASES, ids=IDS)
INF, NAN = float("inf"), float("nan")


def small_params(device: str = "cpu") -> list[torch.nn.Parameter]:
    """A few shapes and layouts (contiguous, channels_last, transposed), small enough for the Triton interpreter."""
    gen = torch.Generator().manual_seed(7)

    def make(shape, layout=lambda t: t):
        return torch.nn.Parameter(layout((torch.randn(shape, generator=gen) * 0.5).to(device)))

    return [make((3, 4)), make((5,)), make((2, 3, 2, 2), lambda t: t.contiguous(memory_format=torch.channels_last)),
            make((4, 3), lambda t: t.t()), make((1,))]


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_equal(got, want, what: str = "") -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"{what}: tensor {i} differs by {(g - w).abs().max().item():.3g}"


def make_opt(kind: str, params, backend: str = "reference", **kw):
    base = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, backend=backend)
    if kind == "asam":
        return fastasam.ASAM(params, torch.optim.SGD, **{"rho": 0.5, "eta": 0.01, **base, **kw})
    if kind == "sam":
        return fastasam.SAM(params, torch.optim.SGD, **{"rho": 0.05, **base, **kw})
    if kind == "looksam":
        return fastasam.LookSAM(params, torch.optim.SGD, **{"rho": 0.1, "k": 2, **base, **kw})
    return fastasam.GSAM(params, torch.optim.SGD, **{"rho": 0.1, "alpha": 0.2, **base, **kw})


KINDS = ["asam", "sam", "looksam", "gsam"]


def two_pass_loop(opt, params, steps: int) -> list[list[torch.Tensor]]:
    """The documented loop (first_step / second_step), the reference for step(closure)."""
    out = []
    for _ in range(steps):
        soup_loss(params).backward()
        if opt.second_pass_needed:
            opt.first_step(zero_grad=True)
            soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        out.append(snapshot(params))
    return out


# --- 2. a parameter listed twice in one param group -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_listed_twice_is_refused_naming_group_and_positions(kind):
    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (2, 3, 4))
    with pytest.raises(ValueError, match=r"param_groups\[0\] lists the same parameter more than once \(at "
                                         r"positions 0 and 2 of its 'params'\).*list\(dict.fromkeys\(params\)\)"):
        make_opt(kind, [a, b, a])
    with pytest.raises(ValueError, match=r"param_groups\[1\] .* positions 0 and 2; 1 and 3 "):
        make_opt(kind, [{"params": [a]}, {"params": [b, c, b, c]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\] .* positions 0 and 1 "):
        make_opt(kind, [("w", a), ("w_again", a)])  # named parameters
    opt = make_opt(kind, [a])
    with pytest.raises(ValueError, match=r"param_groups\[1\] .* positions 0 and 1 "):
        opt.add_param_group({"params": [b, b]})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1  # nothing was added
    opt.add_param_group({"params": b})  # a single tensor, as torch accepts it
    assert opt.param_groups[1]["params"] == [b]


def test_compat_refuses_an_optimizer_whose_group_lists_a_parameter_twice():
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns about it
        sgd = torch.optim.SGD([model.weight, model.bias, model.weight], lr=0.1)
    for cls in (compat.ASAM, compat.SAM):
        with pytest.raises(ValueError, match=r"the optimizer's param_groups\[0\] lists the same parameter more "
                                             r"than once \(at positions 0 and 2"):
            cls(sgd, model)
    cls(torch.optim.SGD(model.parameters(), lr=0.1), model)  # each once: fine


# --- 3. non-finite hyper-parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,name,value", [
    (kind, name, value) for kind in KINDS
    for name, value in [("rho", INF), ("rho", NAN), ("eta", INF), ("eps", INF), ("norm_eps", INF),
                        ("norm_eps", NAN)]
    if not (kind == "sam" and name == "eta")  # SAM has no eta
])
def test_non_finite_hyper_parameters_are_refused_at_construction(kind, name, value):
    with pytest.raises(ValueError, match=rf"invalid {name}={value!r}; it must be a finite number >= 0"):
        make_opt(kind, [torch.nn.Parameter(torch.ones(2))], **{name: value})


@pytest.mark.parametrize("cls", [fastasam.LookSAM, fastasam.GSAM])
@pytest.mark.parametrize("alpha", [INF, NAN])
def test_variants_refuse_a_non_finite_alpha_also_set_later(cls, alpha):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        cls([p], torch.optim.SGD, rho=0.1, lr=0.1, alpha=alpha)
    opt = cls([p], torch.optim.SGD, rho=0.1, lr=0.1, alpha=0.3)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        opt.alpha = alpha
    assert opt.alpha == 0.3
    opt.alpha = 0.5
    assert opt.alpha == 0.5


def test_non_finite_group_options_are_refused_in_add_param_group_and_compat():
    opt = fastasam.ASAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    for key in ("rho", "eta"):
        with pytest.raises(ValueError, match=rf"invalid {key}=inf in param_groups\[1\]; it must be a finite"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], key: INF})
    model = torch.nn.Linear(2, 2)
    for kw in ({"rho": INF}, {"eta": NAN}):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model, **kw)


@ALL
@pytest.mark.parametrize("key,value", [("rho", INF), ("eta", INF), ("rho", NAN)])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_group_option_made_non_finite_later_raises_before_anything_is_perturbed(backend, device, key, value, warm):
    params = small_params(device)
    opt = make_opt("asam", params, backend)
    if warm:  # the plan exists: the changed option goes through the option check of a warm step
        two_pass_loop(opt, params, 2)
    opt.param_groups[0][key] = value
    soup_loss(params).backward()
    before = snapshot(params)
    with pytest.raises(ValueError, match=rf"invalid {key}={value!r} in param_groups\[0\]; it must be a finite"):
        opt.first_step()
    assert_equal(snapshot(params), before, "weights after the refused first_step")
    assert not opt.perturbed
    opt.param_groups[0][key] = 0.5 if key == "rho" else 0.01  # fixed: the loop goes on
    opt.first_step(zero_grad=True)
    soup_loss(params).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in params)


def test_compat_rho_made_non_finite_later_raises_before_anything_is_perturbed():
    model = torch.nn.Linear(3, 2)
    opt = compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(torch.ones(1, 3)).sum().backward()
    opt.ascent_step()
    model(torch.ones(1, 3)).sum().backward()
    opt.descent_step()
    opt.rho = INF
    model(torch.ones(1, 3)).sum().backward()
    before = snapshot(model.parameters())
    with pytest.raises(ValueError, match="invalid rho=inf"):
        opt.ascent_step()
    assert_equal(snapshot(model.parameters()), before, "compat weights")


# --- 4. eps: fastasam's (the norm's) or the base optimizer's -----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad])
def test_an_eps_the_base_optimizer_also_takes_is_refused_with_both_fixes(kind, base):
    p = torch.nn.Parameter(torch.ones(2))
    cls = {"asam": fastasam.ASAM, "sam": fastasam.SAM, "looksam": fastasam.LookSAM, "gsam": fastasam.GSAM}[kind]
    kw = {} if kind in ("asam", "sam") else {"rho": 0.1}
    with pytest.raises(ValueError, match=rf"eps=0.001 is ambiguous: {base.__name__} has an eps option of its own.*"
                                         r"base_optimizer_kwargs=\{'eps': 0.001\}.*norm_eps=0.001"):
        cls([p], base, lr=1e-3, eps=1e-3, **kw)
    opt = cls([p], base, lr=1e-3, norm_eps=1e-3, **kw)  # the norm's
    assert opt._engine.eps == 1e-3 and opt.param_groups[0]["eps"] == base([p]).defaults["eps"]
    opt = cls([p], base, lr=1e-3, base_optimizer_kwargs={"eps": 1e-3}, **kw)  # the base optimizer's
    assert opt._engine.eps == 1e-12 and opt.param_groups[0]["eps"] == 1e-3


def test_eps_stays_the_norms_epsilon_when_the_base_optimizer_has_none():
    p = torch.nn.Parameter(torch.ones(2))
    assert fastasam.ASAM([p], torch.optim.SGD, lr=0.1, eps=1e-3)._engine.eps == 1e-3  # sam.py-style code
    assert fastasam.SAM([p], torch.optim.SGD, lr=0.1, norm_eps=1e-4)._engine.eps == 1e-4
    assert fastasam.ASAM([p], torch.optim.SGD, lr=0.1)._engine.eps == 1e-12
    assert fastasam.ASAM([p], torch.optim.SGD, lr=0.1, eps=1e-12)._engine.eps == 1e-12
    for kw in ({"eps": 1e-3, "norm_eps": 1e-3}, {"eps": 1e-12, "norm_eps": 1e-12}):  # an explicit default counts
        with pytest.raises(ValueError, match="both eps=.* and norm_eps=.* given.*Pass norm_eps= only"):
            fastasam.ASAM([p], torch.optim.SGD, lr=0.1, **kw)


def test_an_eps_taken_through_kwargs_is_ambiguous_too():
    class KwargsOptimizer(torch.optim.SGD):  # its constructor takes eps through **kwargs
        def __init__(self, params, **kwargs):
            eps = kwargs.pop("eps", 1e-8)
            super().__init__(params, **kwargs)
            self.defaults["eps"] = eps
            for group in self.param_groups:
                group.setdefault("eps", eps)

    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"eps=0.001 is ambiguous: KwargsOptimizer.*norm_eps=0.001"):
        fastasam.ASAM([p], KwargsOptimizer, lr=0.1, eps=1e-3)
    assert fastasam.ASAM([p], KwargsOptimizer, lr=0.1, norm_eps=1e-3)._engine.eps == 1e-3


# --- 5. gradients already present when step(closure) begins -----------------------------------------------------


@ALL
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero", ["zero_grad_after", "zero_grad_before"])
def test_the_sam_py_loop_backward_then_step_closure_gives_the_two_pass_trajectory(backend, device, kind, zero):
    """The community sam.py's README loop (and pytorch_optimizer's): loss.backward(), then opt.step(closure) whose
    closure runs the second pass. The gradients present are the first pass's and the closure runs once: exactly the
    trajectory of fastasam's own two-pass loop, and step returns the closure's loss."""
    params = small_params(device)
    opt = make_opt(kind, params, backend)
    want = two_pass_loop(make_opt(kind, (ref := small_params(device)), backend), ref, 4)
    calls = []

    def closure():
        calls.append(1)
        loss = soup_loss(params)
        loss.backward()
        return loss

    for step in range(4):
        if zero == "zero_grad_before":
            opt.zero_grad()
        first = soup_loss(params)
        first.backward()
        loss = opt.step(closure)
        assert len(calls) == (1 if opt.every == 1 or step % opt.every == 0 else 0), step
        assert loss is None or calls
        calls.clear()
        if zero == "zero_grad_after":
            opt.zero_grad()
        assert_equal(snapshot(params), want[step], f"step {step}")


@ALL
@pytest.mark.parametrize("kind", ["asam", "gsam"])
def test_a_first_pass_mixing_new_and_left_gradients_is_refused_before_anything_runs(backend, device, kind):
    """After a step(closure) that left its second pass's gradients, a backward that reaches only some parameters:
    new gradients on those, stale ones on the others. Refused, nothing run."""
    params = small_params(device)
    opt = make_opt(kind, params, backend)
    calls = []

    def closure():
        calls.append(1)
        loss = soup_loss(params)
        loss.backward()
        return loss

    opt.step(closure)
    calls.clear()
    params[0].grad = None
    soup_loss(params[:1]).backward()
    before = snapshot(params)
    with pytest.raises(RuntimeError, match=r"step\(closure\) found new gradients in \.grad on 1 parameter\(s\) and the "
                                           r"gradients the last step\(closure\) left on 4"):
        opt.step(closure)
    assert not calls and not opt.perturbed
    assert_equal(snapshot(params), before, "weights after the refusal")


@ALL
@pytest.mark.parametrize("kind", ["asam", "gsam", "looksam"])
@pytest.mark.parametrize("loop", ["closure_zeroes", "zero_grad_keeps_tensors", "no_zero_grad"])
def test_step_closure_loops_that_leave_the_last_gradients_equal_the_two_pass_loop(backend, device, kind, loop):
    """What step(closure) finds in .grad from its own last call is dropped, not added to: Lightning's automatic
    optimisation (its closure zeroes, then runs backward; nothing zeroes between steps), zero_grad(set_to_none=False)
    between steps (zero-filled tensors, the same objects), and a loop that never zeroes. Each equals the documented
    two-pass loop bit for bit."""
    params, ref = small_params(device), small_params(device)
    opt, ref_opt = make_opt(kind, params, backend), make_opt(kind, ref, backend)
    want = two_pass_loop(ref_opt, ref, 5)

    def closure():
        if loop == "closure_zeroes":
            opt.zero_grad()
        loss = soup_loss(params)
        loss.backward()
        return loss

    got = []
    for _ in range(5):
        if loop == "zero_grad_keeps_tensors":
            opt.zero_grad(set_to_none=False)
        opt.step(closure)
        got.append(snapshot(params))
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_equal(g, w, f"{loop}, step {step}")


# --- 6. a second pass that raises inside step(closure) ----------------------------------------------------------


class Boom(Exception):
    pass


@ALL
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["before_backward", "after_backward"])
def test_a_second_pass_that_raises_leaves_w_restored_and_the_optimizer_usable(backend, device, kind, where):
    """The closure raises at w + e: step(closure) restores w (bit for bit), re-raises the closure's own exception,
    and the run goes on as if the failed step had never been tried (equal to a fresh run without it)."""
    params, ref = small_params(device), small_params(device)
    opt, ref_opt = make_opt(kind, params, backend), make_opt(kind, ref, backend)
    fail_at: list[int] = []
    calls = [0]

    def closure():
        calls[0] += 1
        loss = soup_loss(params)
        if where == "before_backward" and calls[0] in fail_at:
            raise Boom("at w + e")
        loss.backward()
        if where == "after_backward" and calls[0] in fail_at:
            raise Boom("at w + e")
        return loss

    got = []
    for step in range(5):
        if step == 2:  # a step with a second pass for every kind (LookSAM k=2: steps 0, 2, 4)
            assert opt.second_pass_needed
            fail_at[:] = [calls[0] + 2]
            before = snapshot(params)
            state = copy.deepcopy(opt.base_optimizer.state_dict())
            with pytest.raises(Boom, match="at w"):
                opt.step(closure)
            assert not opt.perturbed
            assert_equal(snapshot(params), before, "weights after the failed step")
            after = opt.base_optimizer.state_dict()
            assert all(torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"])
                       for i, s in state["state"].items())
            assert opt.second_pass_needed  # the step counter did not move
        opt.step(closure)
        opt.zero_grad()
        got.append(snapshot(params))
    want = two_pass_loop(ref_opt, ref, 5)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_equal(g, w, f"step {step} after a failed second pass")


# --- 7. the state of another base optimizer class ----------------------------------------------------------------


def _trained(opt, params):
    two_pass_loop(opt, params, 2)
    return opt


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_of_another_base_optimizer_class_is_refused_naming_both(kind):
    params = small_params()
    cls = {"asam": fastasam.ASAM, "sam": fastasam.SAM, "looksam": fastasam.LookSAM, "gsam": fastasam.GSAM}[kind]
    kw = {} if kind in ("asam", "sam") else {"rho": 0.1}
    adam = _trained(cls(params, torch.optim.Adam, lr=1e-3, **kw), params)
    saved = adam.state_dict()
    sgd = _trained(cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, **kw), params)
    before = copy.deepcopy(sgd.state_dict())
    with pytest.raises(ValueError, match=r"saved by a fastasam optimizer around torch.optim.adam.Adam, but this "
                                         rf"{cls.__name__} steps with torch.optim.sgd.SGD"):
        sgd.load_state_dict(saved)
    assert saved["fastasam"]["base_optimizer"] == "torch.optim.adam.Adam"
    after = sgd.state_dict()  # nothing was loaded
    assert after["param_groups"] == before["param_groups"]
    assert after["fastasam"]["base_optimizer"] == before["fastasam"]["base_optimizer"] == "torch.optim.sgd.SGD"
    assert all(torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in before["state"].items())
    two_pass_loop(sgd, params, 1)  # and it still steps
    adamw = cls(params, torch.optim.AdamW, lr=1e-3, **kw)
    with pytest.raises(ValueError, match="around torch.optim.adam.Adam, but this .* torch.optim.adamw.AdamW"):
        adamw.load_state_dict(saved)


def test_a_recorded_class_of_the_same_name_from_another_module_loads():
    """An optimizer class defined in the training script is saved as ``__main__.Name``; loaded where it is imported
    from a module, it is the same class."""
    params = small_params()
    saved = _trained(fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9), params).state_dict()
    saved["fastasam"]["base_optimizer"] = "__main__.SGD"
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.5, momentum=0.9)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1
    saved["fastasam"]["base_optimizer"] = "__main__.MySGD"
    with pytest.raises(ValueError, match="around __main__.MySGD, but this ASAM steps with torch.optim.sgd.SGD"):
        opt.load_state_dict(saved)


def test_a_state_without_the_record_is_checked_by_its_options():
    """A plain torch optimizer's state, or one saved before fastasam recorded the class: the param groups must have
    every option of the base optimizer (those its __setstate__ fills in for old states excepted)."""
    params = small_params()
    adam = torch.optim.Adam(params, lr=1e-3)
    with pytest.raises(ValueError, match=r"param_groups\[0\] of this state has no option\(s\) \['dampening', "
                                         r"'momentum'\], which SGD .* needs"):
        fastasam.ASAM(params, torch.optim.SGD, lr=0.1).load_state_dict(adam.state_dict())
    old = fastasam.ASAM(params, torch.optim.Adam, lr=1e-3, every=2).state_dict()
    old["fastasam"] = {"steps_done": 0}  # as saved before the class was recorded
    with pytest.raises(ValueError, match=r"no option\(s\) \['dampening', 'momentum'\]"):
        fastasam.ASAM(params, torch.optim.SGD, lr=0.1, every=2).load_state_dict(old)
    with pytest.raises(ValueError, match=r"no option\(s\) \['betas', 'eps'\], which Adam"):
        fastasam.ASAM(params, torch.optim.Adam, lr=1e-3).load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
    # an SGD state from before torch added its newer flags still loads (SGD.__setstate__ fills them in)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9).state_dict()
    for key in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
        del sgd["param_groups"][0][key]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.5)
    opt.load_state_dict(sgd)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["fused"] is False


def test_the_plain_base_optimizer_loads_a_fastasam_state():
    """The record is a key the base optimizer's own load_state_dict ignores: the plain SGD resumes from it."""
    params = small_params()
    opt = _trained(fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9), params)
    saved = opt.state_dict()
    plain = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["lr"] == 0.1
    assert torch.equal(plain.state[params[0]]["momentum_buffer"], opt.state[params[0]]["momentum_buffer"])


# --- a step that saw no gradient at all -------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["closure_without_backward", "forgotten_second_backward"])
def test_a_step_that_saw_no_gradient_warns_once_naming_the_fix(backend, device, kind, how):
    """A closure that never calls backward(), or a loop that forgets the second backward: a RuntimeWarning naming the
    fix, once per optimizer (the same mistake again is silent), and none from the correct loop before or after."""
    params = small_params(device)
    opt = make_opt(kind, params, backend)

    def good_step():
        soup_loss(params).backward()
        if opt.second_pass_needed:
            opt.first_step(zero_grad=True)
            soup_loss(params).backward()
        opt.second_step(zero_grad=True)

    def bad_step():
        while not opt.second_pass_needed:  # LookSAM: the mistake is made on a two-pass step
            good_step()
        if how == "closure_without_backward":
            opt.step(lambda: soup_loss(params).detach())
        else:
            soup_loss(params).backward()
            opt.first_step(zero_grad=True)
            opt.second_step(zero_grad=True)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        good_step()
        assert not seen, [str(w.message) for w in seen]
        bad_step()
        bad_step()
        good_step()
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("fastasam: first_step() found no gradient" if how == "closure_without_backward"
                              else "fastasam: second_step() found no gradient")
    assert "loss.backward()" in message and seen[0].category is RuntimeWarning
    assert seen[0].filename == __file__  # it points at the user's line, not at fastasam's
