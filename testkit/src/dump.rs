//! Generated SQL dumps for the database tests and benchmarks: a greeting, two users
//! with real-looking addresses (for sanitize to replace), an empty notes table, and a
//! filler table of random text up to the size asked for. The SQL is plain enough for
//! both PostgreSQL and MariaDB.

use std::io::Write;

/// Writes about `bytes` bytes of SQL whose greeting is `message`.
pub fn write_sql(out: &mut impl Write, bytes: u64, message: &str) -> std::io::Result<()> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    let head = format!(
        "CREATE TABLE greeting (id int PRIMARY KEY, message text);\n\
         INSERT INTO greeting VALUES (1, '{message}');\n\
         CREATE TABLE users (id int PRIMARY KEY, email text);\n\
         INSERT INTO users VALUES (1, 'alice@real-customer.example'), (2, 'bob@real-customer.example');\n\
         CREATE TABLE notes (note varchar(200));\n\
         CREATE TABLE filler (id int, payload text);\n"
    );
    out.write_all(head.as_bytes())?;
    let mut g = crate::rng::Rng::new(0x2545_F491_4F6C_DD1D);
    let (mut written, mut id) = (head.len() as u64, 0u64);
    let mut line = Vec::with_capacity(16 << 10);
    while written < bytes {
        line.clear();
        line.extend_from_slice(b"INSERT INTO filler VALUES ");
        for row in 0..50 {
            id += 1;
            if row > 0 {
                line.push(b',');
            }
            line.extend_from_slice(format!("({id},'").as_bytes());
            for _ in 0..25 {
                let mut r = g.next_u64();
                for _ in 0..10 {
                    line.push(ALPHABET[(r & 63) as usize]);
                    r >>= 6;
                }
            }
            line.extend_from_slice(b"')");
        }
        line.extend_from_slice(b";\n");
        out.write_all(&line)?;
        written += line.len() as u64;
    }
    Ok(())
}
