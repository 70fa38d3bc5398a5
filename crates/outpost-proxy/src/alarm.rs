//! Timeouts that a connection pays for once per timeout period, not once per request.
//!
//! Why: a tokio timer is registered in the runtime's timer wheel when first polled and taken
//! out when dropped, each under the driver's lock. The two timeouts every proxied request had
//! (hyper's header-read timer, the origin response timeout) cost ~2.1k instructions of ~30k
//! (`bench/instructions.sh`). An [`Alarm`] keeps one tokio timer per connection and re-arms it
//! lazily: while it is set no later than the deadline being waited for, it is left alone, and
//! when it goes off early the waiter moves it on to its own deadline. A request that finishes
//! before its deadline touches the wheel not at all. The price is one early wake-up of the
//! connection's task per timeout period, which the task takes as a spurious poll.
//!
//! An alarm wakes only the task that polled it last, so each one belongs to a single waiter
//! at a time: the task of an HTTP/1 client connection (hyper polls the header-read timer and
//! the service on that task), or the exchange that holds an origin connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// One tokio timer, re-armed only when a deadline needs it.
#[derive(Debug, Default)]
pub struct Alarm {
    /// The timer and the deadline it is set to; created at the first wait.
    timer: Option<(Pin<Box<Sleep>>, Instant)>,
}

impl Alarm {
    /// Ready once `deadline` has passed; otherwise the task of `cx` is woken by then (possibly
    /// earlier, for a deadline waited on before).
    pub fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.timer {
                None => self.timer = Some((Box::pin(tokio::time::sleep_until(deadline)), deadline)),
                // Set later than needed: brought forward.
                Some((sleep, set)) if *set > deadline => {
                    sleep.as_mut().reset(deadline);
                    *set = deadline;
                }
                Some((sleep, set)) => match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if *set == deadline => return Poll::Ready(()),
                    // It went off for an earlier deadline: on to this one.
                    Poll::Ready(()) => {
                        sleep.as_mut().reset(deadline);
                        *set = deadline;
                    }
                },
            }
        }
    }
}

/// `start + timeout`, or a date decades away for a timeout too large to add (a configured
/// `"300000000000y"` parses, and `+` would panic on every request).
pub fn deadline_after(start: Instant, timeout: std::time::Duration) -> Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + std::time::Duration::from_secs(86_400 * 365 * 30))
}

/// hyper's timer for one HTTP/1 client connection: every sleep it asks for shares the
/// connection's [`Alarm`]. hyper asks for one per request (the header-read timeout).
///
/// One per connection, never shared: an alarm wakes only the task that polled it last, so
/// connections sharing a timer (a builder reused across connections, say) would leave all but
/// one without their timeouts. Hence no `Clone`.
#[derive(Debug, Default)]
pub struct ConnTimer {
    alarm: Arc<Mutex<Alarm>>,
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(deadline_after(Instant::now(), duration).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ConnSleep {
            deadline: Instant::from_std(deadline),
            alarm: self.alarm.clone(),
        })
    }

    /// Records the new deadline; the alarm follows at the sleep's next poll (hyper polls right
    /// after a reset).
    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<ConnSleep>() {
            Some(mine) => mine.get_mut().deadline = Instant::from_std(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        // tokio's clock, so that tests with a paused clock see hyper's deadlines move with it.
        Instant::now().into_std()
    }
}

/// A wait on a [`ConnTimer`]'s alarm.
#[derive(Debug)]
struct ConnSleep {
    deadline: Instant,
    alarm: Arc<Mutex<Alarm>>,
}

impl Future for ConnSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        self.alarm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .poll_until(deadline, cx)
    }
}

impl hyper::rt::Sleep for ConnSleep {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn poll_at(alarm: &mut Alarm, deadline: Instant) -> Poll<()> {
        let waker = std::task::Waker::noop();
        alarm.poll_until(deadline, &mut Context::from_waker(waker))
    }

    /// Deadlines later than the one set leave the timer alone; each still fires at its own
    /// time, neither early nor late; an earlier deadline brings the timer forward.
    #[tokio::test(start_paused = true)]
    async fn each_deadline_fires_at_its_own_time() {
        let t0 = Instant::now();
        let mut alarm = Alarm::default();
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(10)).is_pending());
        // A later deadline: the timer stays at 10 s.
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(25)).is_pending());
        assert_eq!(
            alarm.timer.as_ref().map(|t| t.1),
            Some(t0 + Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        // At 11 s the 25 s deadline is not due: the alarm moves on to it.
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(25)).is_pending());
        assert_eq!(
            alarm.timer.as_ref().map(|t| t.1),
            Some(t0 + Duration::from_secs(25))
        );
        tokio::time::advance(Duration::from_secs(13)).await;
        assert!(
            poll_at(&mut alarm, t0 + Duration::from_secs(25)).is_pending(),
            "24 s < 25 s"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(25)).is_ready());
        // An earlier deadline than the one set brings it forward.
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(60)).is_pending());
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(30)).is_pending());
        assert_eq!(
            alarm.timer.as_ref().map(|t| t.1),
            Some(t0 + Duration::from_secs(30))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(poll_at(&mut alarm, t0 + Duration::from_secs(30)).is_ready());
        // A deadline already past is ready at once.
        assert!(poll_at(&mut alarm, t0).is_ready());
    }

    /// The task waiting on a deadline is woken by the timer, including when the timer first
    /// goes off for an earlier deadline nobody waits for any more.
    #[tokio::test(start_paused = true)]
    async fn the_waiting_task_is_woken() {
        let t0 = Instant::now();
        assert_eq!(
            deadline_after(t0, Duration::from_secs(2)),
            t0 + Duration::from_secs(2)
        );
        assert!(deadline_after(t0, Duration::MAX) > t0 + Duration::from_secs(86_400 * 365));
        let mut alarm = Alarm::default();
        // An early deadline, abandoned (a request that finished in time).
        assert!(poll_at(&mut alarm, t0 + Duration::from_millis(100)).is_pending());
        let mut alarm = std::pin::pin!(async move {
            std::future::poll_fn(|cx| alarm.poll_until(t0 + Duration::from_secs(3), cx)).await;
            Instant::now()
        });
        let woke = tokio::time::timeout(Duration::from_secs(60), &mut alarm)
            .await
            .expect("the alarm went off");
        assert_eq!(woke, t0 + Duration::from_secs(3));
    }

    /// With hyper's HTTP/1 server: the header-read timeout of each request is its own. The
    /// alarm set for the first requests (5 s) goes off while the third one's head is read
    /// (from 3 s, due at 8 s) and is moved on: the connection is cut at 8 s, not at 5.
    #[tokio::test(start_paused = true)]
    async fn hyper_cuts_a_slow_head_at_its_own_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server_io, mut client) = tokio::io::duplex(4096);
        let started = Instant::now();
        let server = tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(ConnTimer::default())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(server_io), svc)
                .await;
            Instant::now()
        });
        let mut answers = String::new();
        let mut read_answer = async |client: &mut tokio::io::DuplexStream| {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.expect("answer");
            answers.push_str(&String::from_utf8_lossy(&buf[..n]));
        };
        client
            .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        read_answer(&mut client).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        client
            .write_all(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        read_answer(&mut client).await;
        // The third head never completes.
        client
            .write_all(b"GET /3 HTTP/1.1\r\n")
            .await
            .expect("write");
        let closed = server.await.expect("server task");
        assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
        assert_eq!(closed - started, Duration::from_secs(8));
    }

    /// hyper's use: a sleep per request from the same timer, reset, dropped unfinished; the
    /// one still waited for fires on time.
    #[tokio::test(start_paused = true)]
    async fn hyper_sleeps_share_the_connection_alarm() {
        use hyper::rt::Timer as _;
        let timer = ConnTimer::default();
        let t0 = timer.now();
        for _ in 0..3 {
            let mut sleep = timer.sleep(Duration::from_secs(5));
            let waker = std::task::Waker::noop();
            assert!(
                sleep
                    .as_mut()
                    .poll(&mut Context::from_waker(waker))
                    .is_pending()
            );
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let mut sleep = timer.sleep(Duration::from_secs(5));
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(7));
        sleep.await;
        assert_eq!(timer.now() - t0, Duration::from_secs(10));
    }
}
