-- 0017_prices_as_data: where each price came from, and as of when.
--
-- `batchdb prices update [FILE]` (batchdb/price_list.py) writes prices from a price map
-- (LiteLLM's format, or the dated map shipped in the package) and records the map's name
-- and date with every row it writes or confirms; the dashboard's Cost page shows the date.
-- NULL: not recorded (seeded by 0001 or written by hand before this migration, or since
-- with plain SQL).

ALTER TABLE batchdb.prices ADD COLUMN source text, ADD COLUMN as_of date;

COMMENT ON COLUMN batchdb.prices.source IS
    'The price map this row was last written or confirmed from (batchdb prices update); NULL: by hand or seeded.';
COMMENT ON COLUMN batchdb.prices.as_of IS
    'The date of the prices in that map; NULL: unknown.';

-- What a map (or a hand) may write: a discount is a share (0 to 1), a cached price is a price.
ALTER TABLE batchdb.prices
    ADD CONSTRAINT prices_batch_discount_is_a_share CHECK (batch_discount IS NULL OR batch_discount BETWEEN 0 AND 1),
    ADD CONSTRAINT prices_cached_input_nonnegative CHECK (cached_input_per_mtok IS NULL OR cached_input_per_mtok >= 0);
