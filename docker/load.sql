-- pgbench script: a customer places an order and one is paid.
\set customer random(1, 20000)
BEGIN;
INSERT INTO orders (customer_id, total) VALUES (:customer, 42.00);
INSERT INTO order_items (customer_id, order_id, sku, qty, price) VALUES (:customer, currval('orders_order_id_seq'), 'sku-1', 1, 42.00);
UPDATE orders SET status = 'paid' WHERE customer_id = :customer AND status = 'new';
COMMIT;
