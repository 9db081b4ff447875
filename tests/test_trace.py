"""Busy time per op group from a profiler trace (tfpar/trace.py)."""

from tests.testbase import TestCase, absltest, tf
from tfpar import trace


class UnionLengthTest(absltest.TestCase):

    def test_overlaps_count_once(self):
        self.assertEqual(trace._union_length([]), 0)  # pylint: disable=protected-access
        self.assertEqual(trace._union_length([(0, 10), (5, 15), (20, 30)]), 25)  # pylint: disable=protected-access
        self.assertEqual(trace._union_length([(20, 30), (0, 40), (35, 50)]), 50)  # pylint: disable=protected-access


class TracedBusyTest(TestCase):

    def test_groups_of_a_traced_step(self):
        a = tf.random.normal((256, 256))

        @tf.function
        def step():
            with tf.name_scope("group_x"):
                x = tf.reduce_sum(tf.matmul(a, a))
            with tf.name_scope("group_y"):
                y = tf.reduce_sum(tf.matmul(a, a, transpose_b=True))
            return x + y

        step()
        busy, wall = trace.traced_busy_seconds(lambda: step().numpy(), r"(group_\w)/", steps=2)
        self.assertCountEqual(busy, ["group_x", "group_y"])
        for seconds in busy.values():
            self.assertTrue(0 < seconds <= wall, (busy, wall))


if __name__ == "__main__":
    absltest.main()
