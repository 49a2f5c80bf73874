-- 0014_one_cost_rule: one function prices a call's tokens.
--
-- The cost of a call was written out wherever it was needed: in the completion
-- statement, in the worker's budget estimate and twice in the dashboard, which
-- disagreed on a call without max_tokens. Recorded costs now come from this
-- function (sql/queries.sql: complete_batch); batchdb/pricing.py is its Python
-- twin for the estimates made before a row is written, and tests/test_pricing.py
-- holds the two to the same answers. NULL when the model has no price: a cost
-- nobody knows is not $0 (the completion records 0 for the row and the job shows
-- its cost as unknown).

CREATE FUNCTION batchdb.call_cost_usd(p_input_per_mtok numeric, p_output_per_mtok numeric,
                                      p_prompt_tokens bigint, p_completion_tokens bigint)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (p_prompt_tokens * p_input_per_mtok + p_completion_tokens * p_output_per_mtok) / 1000000
$$;

GRANT EXECUTE ON FUNCTION batchdb.call_cost_usd(numeric, numeric, bigint, bigint) TO PUBLIC;
