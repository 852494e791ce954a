"""transformers' own generic model and config tests, run on BriLLM as on an in-tree model.

``ModelTesterMixin`` and ``ConfigTester`` come from the source distribution of the installed transformers
version (see `transformers_sdist`; fetched once by ``make setup`` / ``.ci/run``, never here). Tests that do
not apply to BriLLM are skipped below with the reason.
"""

import unittest
from pathlib import Path
from unittest import mock

import pytest
import transformers
from transformers.models.auto import modeling_auto
from transformers_sdist import load, tests_folder

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM, BriLLMModel

test_modeling_common, test_configuration_common = load()
ModelTesterMixin, ConfigTester = test_modeling_common.ModelTesterMixin, test_configuration_common.ConfigTester
ids_tensor, random_attention_mask = test_modeling_common.ids_tensor, test_modeling_common.random_attention_mask


class BriLLMModelTester:
    """Tiny random BriLLM configs and inputs, in the shape `ModelTesterMixin` expects."""

    def __init__(self, parent, batch_size=3, seq_length=7, vocab_size=19, hidden_size=8, is_training=True):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers = 1  # one signal recurrence; `hidden_states` holds its output only
        self.expected_num_hidden_layers = 1

    def get_config(self):
        return BriLLMConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, max_position_embeddings=2 * self.seq_length
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class BriLLMModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BriLLMModel, BriLLMForCausalLM)
    has_attentions = False  # a signal flows along edges: there is no attention
    test_resize_embeddings = False  # no embedding matrix: a token is a graph node
    test_can_init_all_missing_weights_before_2023 = True  # new model: hold it to the current rule

    def setUp(self):
        # Listed as an in-tree model would be, so the mixin knows the base model and the causal LM (labels, loss).
        for mapping, name in ((modeling_auto.MODEL_MAPPING_NAMES, "BriLLMModel"),
                              (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "BriLLMForCausalLM")):  # fmt: skip
            self.enterContext(mock.patch.dict(mapping, {"brillm": name}))
        self.model_tester = BriLLMModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=BriLLMConfig, common_properties=["hidden_size", "max_position_embeddings"],
            hidden_size=8, vocab_size=19,
        )  # fmt: skip

    @unittest.skip("GenerationTesterMixin lives in tests/generation/test_utils.py, which the sdist does not ship")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("no embedding matrix to get or set: a token is a graph node (see test_no_embedding_matrix)")
    def test_model_get_set_embeddings(self):
        pass

    def test_config(self):
        # run_common_tests() minus check_config_arguments_init, whose kwargs file the sdist does not ship
        tester = self.config_tester
        tester.create_and_test_config_common_properties()
        tester.create_and_test_config_to_json_string()
        tester.create_and_test_config_to_json_file()
        tester.create_and_test_config_from_and_save_pretrained()
        tester.create_and_test_config_from_and_save_pretrained_subfolder()
        tester.create_and_test_config_from_and_save_pretrained_composite()
        tester.create_and_test_config_with_num_labels()
        tester.create_and_test_config_from_pretrained_custom_kwargs()
        tester.check_config_can_be_init_without_params()




def test_the_sdist_matches_the_installed_transformers():
    assert Path(test_modeling_common.__file__).parent == tests_folder()
    assert tests_folder().parent.name == f"transformers-{transformers.__version__}"


def test_a_missing_sdist_fails_loudly(tmp_path):
    with pytest.raises(RuntimeError, match="make setup"):
        tests_folder(transformers.__version__, cache=tmp_path)
