"""Backend options (issue 15, class 9): every option is checked for type and range where it is given,
with an error naming the option, the value and what is accepted; never taken the wrong way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scaling_compile as sc
from scaling_compile.backend import scaling_backend

from models import ToyDiT, random_block_masks

WRONG = {
    "strict as a string": ({"strict": "false"}, r"strict='false'.*True or False"),
    "strict as an int": ({"strict": 1}, r"strict=1.*True or False"),
    "budget as a string": ({"budget": "0.3"}, r"budget='0.3'.*number in \(0, 1\]"),
    "budget as a bool": ({"budget": True}, r"budget=True"),
    "budget NaN": ({"budget": float("nan")}, r"budget=nan.*\(0, 1\]"),
    "budget zero": ({"budget": 0}, r"budget=0.*\(0, 1\]"),
    "schedule as an int": ({"schedule": 5}, r"schedule=5.*StepSchedule"),
    "kernel unknown": ({"kernel": "cuda"}, r"kernel='cuda'.*\('auto', 'triton', 'fa4', 'gluon'\)"),
    "kernel not a string": ({"kernel": 3}, r"kernel=3"),
    "inner unknown": ({"inner": "aot_eager"}, r"inner='aot_eager'.*\('inductor', 'eager'\)"),
    "mode unknown": ({"mode": "fast"}, r"mode='fast'.*reduce-overhead"),
    "policy not a string": ({"policy": ["west"]}, r"policy=\['west'\]"),
    "policy_options a list": ({"policy": "haste", "policy_options": [("top_p", 0.9)]}, r"policy_options=.*dict"),
    "artifact a number": ({"artifact": 3}, r"artifact=3.*\.safetensors"),
    "artifact empty": ({"artifact": ""}, r"artifact=''.*empty path"),
    "unknown name": ({"artefact": "x"}, r"unknown option.*artefact.*valid options"),
    "non-string name": ({3: "x"}, r"unknown option.*3"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_option_names_the_option_value_and_what_is_accepted(case):
    options, message = WRONG[case]
    with pytest.raises(sc.ScalingCompileError, match=message):
        sc.BackendOptions.from_dict(options)


@pytest.mark.parametrize("options", ["strict", ["artifact", "x.safetensors"], 3])
def test_options_that_are_not_a_dict(options):
    with pytest.raises(sc.ScalingCompileError, match=r"options=.*pass a dict"):
        sc.BackendOptions.from_dict(options)


def test_a_backend_options_instance_is_checked_when_made_and_accepted_as_options():
    with pytest.raises(sc.ScalingCompileError, match="strict='false'"):
        sc.BackendOptions(strict="false")
    options = sc.BackendOptions(kernel="Triton", inner="EAGER", budget=1)
    assert (options.kernel, options.inner, options.budget) == ("triton", "eager", 1.0)  # canonical
    assert sc.BackendOptions.from_dict(options) is options
    with pytest.raises(Exception):
        options.strict = "yes"  # frozen: a checked instance stays checked


def test_backend_serves_with_a_backend_options_instance():
    torch._dynamo.reset()
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 32, 32)
    masks = random_block_masks(["blocks.0"], 2, 2, density=0.5, seed=3)
    topology = sc.Topology.from_block_masks(masks, block_size=16, seq_len=32)
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return scaling_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=spy, options=sc.BackendOptions(artifact=topology, inner="eager"))
    with torch.no_grad():
        compiled(x)
    assert any(n.target is torch.ops.scaling.sparse_sdpa.default for gm in graphs for n in gm.graph.nodes)
    torch._dynamo.reset()


def test_strict_false_string_through_torch_compile_is_an_error_not_strict():
    torch._dynamo.reset()
    model = ToyDiT(modes=("causal",)).eval()
    compiled = torch.compile(model, backend="scaling", options={"strict": "false"})
    with pytest.raises(Exception, match="strict='false'"), torch.no_grad():
        compiled(torch.randn(1, 32, 32))
    torch._dynamo.reset()


_any = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["triton", "FA4", "auto", "eager", "inductor", "west", "haste", "svoo+haste",
                     "reduce-overhead", "max-autotune", "0.3", "true"]),
)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["budget", "strict", "inner", "kernel", "policy", "policy_options", "schedule",
                             "mode", "artifact"]), value=_any)
def test_fuzz_every_option_value_is_accepted_as_meant_or_refused_by_name(name, value):
    try:
        options = sc.BackendOptions.from_dict({name: value})
    except sc.ScalingCompileError as error:
        assert name in str(error)
        return
    accepted = getattr(options, name)
    if name == "strict":
        assert accepted is value and isinstance(value, bool)
    elif name == "budget":
        assert value is None or (isinstance(accepted, float) and 0 < accepted <= 1 and accepted == value)
    elif name in ("inner", "kernel", "mode", "policy") and value is not None:
        assert isinstance(value, str) and accepted in {
            "inner": ("inductor", "eager"), "kernel": ("triton", "fa4", "auto"),
            "mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
            "policy": sc.options.POLICIES}[name]
    elif name == "schedule":
        assert value is None
    elif name == "artifact":
        assert value is None or (isinstance(value, str) and value)


# -- typed policy configs (torchao's style), beside the name + policy_options form ----------------
@pytest.mark.parametrize("config, name, options", [
    ("WestConfig()", "west", None),
    ("HasteConfig(top_p=0.9)", "haste", {"top_p": 0.9}),
    ("HasteConfig(top_p=0.8, west_prior=True, prior_share=0.3)", "west+haste", {"top_p": 0.8, "prior_share": 0.3}),
    ("SvooConfig(clusters=4, level=0.3)", "svoo", {"clusters": 4, "level": 0.3}),
    ("SvooConfig(reuse=True, drift_threshold=0.1)", "svoo+haste", {"drift_threshold": 0.1}),
])
def test_a_policy_config_is_its_name_and_options(config, name, options):
    """A typed config and the string/dict form it stands for make the same options and the same
    run-time policy settings."""
    from scaling_compile import policies
    from scaling_compile.policies.config import make_online_policy

    typed = sc.BackendOptions.from_dict({"policy": eval(config, vars(policies))})
    named = sc.BackendOptions.from_dict({"policy": name, "policy_options": options})
    assert typed.policy == named.policy == name
    if name == "west":
        assert typed.policy_options is None
        return
    made = [make_online_policy(o.policy, topology=None, budget=None, options=o.policy_options, block_size=16)
            for o in (typed, named)]
    assert made[0].settings == made[1].settings
    assert getattr(made[0], "reuse", None) == getattr(made[1], "reuse", None)


def test_a_policy_config_refuses_separate_options_and_bad_values():
    from scaling_compile.policies import HasteConfig, SvooConfig

    with pytest.raises(sc.ScalingCompileError, match="a policy config holds its options"):
        sc.BackendOptions(policy=HasteConfig(), policy_options={"top_p": 0.5})
    with pytest.raises(sc.ScalingCompileError, match="top_p=2.0 must be in"):
        sc.BackendOptions(policy=HasteConfig(top_p=2.0))
    with pytest.raises(sc.ScalingCompileError, match="clusters must be >= 1"):
        sc.BackendOptions(policy=SvooConfig(clusters=0))
    with pytest.raises(sc.ScalingCompileError, match="HasteConfig"):
        sc.BackendOptions(policy=3)
