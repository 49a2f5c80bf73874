-- 0015_sql_jobs_need_a_known_model: a job inserted through plain SQL is refused, like one
-- submitted through the SDK or CLI, when its model has no row in batchdb.prices.
--
-- A typo ('gpt-4o-mni') would otherwise run every row at an unknown cost, shown as $0,
-- and slip past any budget. The refusal names the closest priced model of the job's
-- provider. A model batchdb does not know (a fine-tune, an Azure deployment name, a
-- self-hosted server) runs with `allow_unknown_model = true`, as submit(...,
-- allow_unknown_model=True) and `--allow-unknown-model` already allow; its cost then
-- shows as unknown. The 'instant' provider (no network, no cost) takes any model.

ALTER TABLE batchdb.jobs ADD COLUMN allow_unknown_model boolean NOT NULL DEFAULT false;
GRANT INSERT (allow_unknown_model) ON batchdb.jobs TO batchdb_user;

-- SECURITY DEFINER: reads prices whatever the inserting role may read.
CREATE FUNCTION batchdb.jobs_check_model() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    known text[];
BEGIN
    IF NEW.allow_unknown_model OR NEW.model IS NULL OR NEW.provider IS NULL OR NEW.provider = 'instant' THEN
        RETURN NEW;  -- a missing model or provider is refused by jobs_validate
    END IF;
    IF EXISTS (SELECT 1 FROM batchdb.prices p WHERE p.provider = NEW.provider AND p.model = NEW.model) THEN
        RETURN NEW;
    END IF;
    SELECT array_agg(p.model ORDER BY p.model) INTO known FROM batchdb.prices p WHERE p.provider = NEW.provider;
    RAISE EXCEPTION 'batchdb.jobs.model: no price for %/% in batchdb.prices%; add its price, or insert the job '
                    'with allow_unknown_model = true (its cost then shows as unknown)',
        NEW.provider, NEW.model,
        coalesce(' (did you mean "' || batchdb.closest_name(NEW.model, known) || '"?)', '')
        USING ERRCODE = 'check_violation';
END;
$$;

-- Named to fire after jobs_validate (BEFORE triggers fire in name order): a missing model or an
-- unknown provider is told first, as such.
CREATE TRIGGER jobs_validate_model BEFORE INSERT ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_check_model();
