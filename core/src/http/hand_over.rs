//! A stop's boundary on one connection. The next run takes the packet ring over from the boundary, so it
//! joins every connection there: this decides which requests the stopping run bills and which the next run
//! does, so that each is billed once, and it lists the answers the next run will see to requests the
//! stopping run billed, which the next run must not pair with its own.
//!
//! The next run's parser decides as for any joined stream (`parser::Joined`): if the client's first bytes
//! begin a request, it takes that request and those after; if they do not, it takes none until the server
//! has spoken; if the server speaks first, it takes the requests it finds after. The stopping run makes the
//! same decision on the same bytes, whatever its own parser's state there.
//!
//! Where the stopping run knows the client's framing at the boundary (between two requests, inside a body
//! of known length, or inside a chunked body at a chunk's data or the start of one of its lines), it hands
//! over where the next run can pick the client up in step (`client_resume`), and the next run starts there:
//! a body whose bytes look like requests is then never searched for them. No request begins between the
//! boundary and that place, nor before the body's end after it, so the requests from there are the next run's.

use super::parser::{RequestMethod, ResumeIn};
use crate::source::frames::Address;

/// A connection as both runs name it: client and server, address and port.
pub type ConnectionKey = (Address, u16, Address, u16);

/// What a stop leaves the next run about one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionHandOver {
    pub key: ConnectionKey,
    /// the methods of requests billed before, whose answers come first, in order
    pub answers: Vec<RequestMethod>,
    /// the client's sequence number where its stream can be picked up in step, and into what, if the
    /// stopping run knew it
    pub client_resume: Option<(u32, ResumeIn)>,
    /// restarts this was carried through for a connection no run saw since
    pub restarts: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// nothing has crossed the boundary yet on this connection
    Undecided,
    /// requests whose first byte is at or past this position are the next run's
    NextRunFrom(u64),
    /// the next run takes no request until the server has spoken: up to then they are this run's
    UntilAnswer,
}

#[derive(Debug)]
pub struct HandOver {
    client_at: u64,
    server_at: u64,
    decision: Decision,
    /// The methods of this run's requests whose final answer begins past the boundary (a HEAD's answer has
    /// no body), in order.
    pub owed: Vec<RequestMethod>,
    /// where the client's stream can be picked up in step, handed over
    pub client_resume: Option<(u64, ResumeIn)>,
}

impl HandOver {
    /// The boundary falls at these positions of the client's and the server's streams; `client_resume`:
    /// where the client can be picked up in step, if known and handed over (the next run starts there).
    pub fn at(client_at: u64, server_at: u64, client_resume: Option<(u64, ResumeIn)>) -> HandOver {
        let decision = client_resume.map_or(Decision::Undecided, |(at, _)| Decision::NextRunFrom(at));
        HandOver { client_at, server_at, decision, owed: Vec::new(), client_resume }
    }

    /// A connection first seen past the boundary: the next run sees it from the same place, so all of it
    /// is the next run's.
    pub fn all_next_runs() -> HandOver {
        HandOver { client_at: 0, server_at: 0, decision: Decision::NextRunFrom(0), owed: Vec::new(), client_resume: None }
    }

    /// The client's bytes, `begin_a_request` if a joined stream's parser takes them for a request's start.
    pub fn client_data(&mut self, begin_a_request: bool) {
        if self.decision == Decision::Undecided {
            self.decision = if begin_a_request { Decision::NextRunFrom(self.client_at) } else { Decision::UntilAnswer };
        }
    }

    /// The server's bytes; `client_end` is where the client's stream is now.
    pub fn server_data(&mut self, client_end: u64) {
        self.decision = match self.decision {
            Decision::Undecided => Decision::NextRunFrom(self.client_at),
            Decision::UntilAnswer => Decision::NextRunFrom(client_end),
            decided => decided,
        };
    }

    /// A connection first seen past this run's boundary was read in step from `position`, as the previous
    /// run said (so will the next run be): the requests from there are the next run's, and that is handed on.
    /// (If the server spoke first, what came before `position` is the end of a body: no request either.)
    pub fn resume_at(&mut self, position: u64, into: ResumeIn) {
        if matches!(self.decision, Decision::Undecided)
            || matches!(self.decision, Decision::NextRunFrom(from) if from <= position)
        {
            self.decision = Decision::NextRunFrom(position);
            self.client_resume = Some((position, into));
        }
    }

    /// Whether the request whose first byte is at `position` is the next run's.
    pub fn next_runs(&self, position: u64) -> bool {
        matches!(self.decision, Decision::NextRunFrom(from) if position >= from)
    }

    /// Waiting for the server before the next run takes requests: what the client sends is this run's.
    pub fn until_answer(&self) -> bool {
        self.decision == Decision::UntilAnswer
    }

    /// A final answer to one of this run's requests begins at `position` of the server's stream.
    pub fn answer_begins(&mut self, position: u64, method: RequestMethod) {
        if position >= self.server_at {
            self.owed.push(method);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_takes_the_requests_from_the_boundary_when_the_clients_first_bytes_begin_one() {
        let mut hand_over = HandOver::at(100, 50, None);
        hand_over.client_data(true);
        hand_over.server_data(180);
        assert!(!hand_over.next_runs(99) && hand_over.next_runs(100) && hand_over.next_runs(500));
    }

    #[test]
    fn when_they_do_not_the_requests_before_the_servers_answer_stay_this_runs() {
        let mut hand_over = HandOver::at(100, 50, None);
        hand_over.client_data(false);
        assert!(hand_over.until_answer() && !hand_over.next_runs(150));
        hand_over.client_data(true); // a later segment that begins a request: the next run still waits
        assert!(!hand_over.next_runs(150));
        hand_over.server_data(200);
        assert!(!hand_over.next_runs(150) && hand_over.next_runs(200));
    }

    #[test]
    fn when_the_server_speaks_first_the_next_run_takes_what_it_finds_after() {
        let mut hand_over = HandOver::at(100, 50, None);
        hand_over.server_data(100);
        hand_over.client_data(false);
        assert!(hand_over.next_runs(100) && !hand_over.until_answer());
    }

    #[test]
    fn where_the_next_request_begins_is_known_the_next_run_takes_the_requests_from_there() {
        let mut hand_over = HandOver::at(100, 50, Some((400, ResumeIn::Message))); // inside a body that ends at 400
        hand_over.client_data(true); // the body's bytes look like a request: they are not one
        assert!(!hand_over.next_runs(100) && !hand_over.next_runs(399) && hand_over.next_runs(400));
        assert!(!hand_over.until_answer());
    }

    #[test]
    fn only_answers_beginning_past_the_boundary_are_owed() {
        let mut hand_over = HandOver::at(100, 50, None);
        hand_over.answer_begins(20, RequestMethod::Other); // began before: the next run resyncs past it
        hand_over.answer_begins(50, RequestMethod::Head);
        hand_over.answer_begins(90, RequestMethod::Other);
        assert_eq!(hand_over.owed, [RequestMethod::Head, RequestMethod::Other]);
        assert!(HandOver::all_next_runs().next_runs(0));
    }
}
