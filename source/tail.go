package source

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// Tail holds one long-lived GET open and publishes each NDJSON line as it
// arrives. When the upstream ends or fails it reconnects with backoff.
type Tail struct {
	Config
}

// errLineTooLong marks a line over MaxBody, which is skipped.
var errLineTooLong = errors.New("line over max_body")

// errIdle ends a stream that sent nothing for ReadTimeout.
var errIdle = errors.New("upstream sent nothing within read_timeout")

// Run tails the upstream until ctx ends.
func (t *Tail) Run(ctx context.Context, sink Sink) {
	client := newClient(t.Timeout)
	defer client.CloseIdleConnections()
	failures := 0
	for {
		delivered, err := t.stream(ctx, client, sink)
		if ctx.Err() != nil {
			return
		}
		if delivered {
			failures = 0
		}
		failures++
		delay := t.Backoff.Delay(failures, retryAfterOf(err))
		if err != nil {
			t.Logger.Warn("tail failed; reconnecting",
				zap.Error(t.redact(err)), zap.Int("failures", failures), zap.Duration("retry_in", delay))
		} else {
			t.Logger.Debug("upstream ended the stream; reconnecting", zap.Duration("retry_in", delay))
		}
		if !sleep(ctx, delay) {
			return
		}
	}
}

// stream makes one request and publishes its lines until the response ends.
// It reports whether any line was published, and the error that ended it,
// which is nil for a clean end of stream.
func (t *Tail) stream(ctx context.Context, client *http.Client, sink Sink) (bool, error) {
	reqCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	resp, err := t.connect(reqCtx, client, sink)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	sink.Answered(resp.StatusCode)
	if err := checkStatus(resp, time.Now()); err != nil {
		t.failed(ctx, ReasonStatus)
		return false, err
	}
	t.Observer.UpstreamRequest("ok")

	var body io.Reader = resp.Body
	if t.ReadTimeout > 0 {
		idle := newIdleReader(resp.Body, t.ReadTimeout, func() { cancel(errIdle) })
		defer idle.stop()
		body = idle
	}
	lines := NewLineReader(body, t.MaxBody)
	delivered := false
	var batch []json.RawMessage
	for {
		line, err := lines.Next()
		switch {
		case errors.Is(err, errLineTooLong):
			t.Observer.UpstreamError(ReasonTooLarge)
			t.Logger.Warn("skipped an NDJSON line over max_body", zap.Int64("max_body", t.MaxBody))
		case err != nil:
			if len(batch) > 0 {
				sink.Publish(batch)
				delivered = true
			}
			if errors.Is(err, io.EOF) {
				return delivered, nil
			}
			if ctx.Err() == nil {
				t.Observer.UpstreamError(ReasonRead)
			}
			if errors.Is(context.Cause(reqCtx), errIdle) {
				err = fmt.Errorf("%w (%v)", errIdle, t.ReadTimeout)
			}
			return delivered, err
		case len(line) == 0:
		case json.Valid(line):
			batch = append(batch, line)
		default:
			t.Observer.UpstreamError(ReasonInvalidJSON)
			t.Logger.Warn("skipped an NDJSON line that is not valid JSON", zap.Int("length", len(line)))
		}
		// Publish what has arrived unless another whole line is already
		// buffered: events that arrive together go out together, and none
		// waits for a later one.
		if len(batch) > 0 && !lines.LineBuffered() {
			sink.Publish(batch)
			delivered = true
			batch = nil
		}
	}
}

// connect makes the request and returns the response once its headers
// arrived, holding a slot of Limit until then.
func (t *Tail) connect(ctx context.Context, client *http.Client, sink Sink) (*http.Response, error) {
	if !t.acquire(ctx) {
		return nil, ctx.Err()
	}
	defer t.release()
	req, err := t.newRequest(ctx, sink)
	if err != nil {
		return nil, err
	}
	return t.send(ctx, client, req, sink)
}

// idleReader calls a function when no byte arrives for a while.
type idleReader struct {
	r       io.Reader
	timeout time.Duration
	timer   *time.Timer
}

// newIdleReader returns a reader of r that calls onIdle, from its own
// goroutine, when timeout passes without a byte read.
func newIdleReader(r io.Reader, timeout time.Duration, onIdle func()) *idleReader {
	return &idleReader{r: r, timeout: timeout, timer: time.AfterFunc(timeout, onIdle)}
}

func (ir *idleReader) Read(p []byte) (int, error) {
	n, err := ir.r.Read(p)
	if n > 0 {
		ir.timer.Reset(ir.timeout)
	}
	return n, err
}

// stop ends the watch.
func (ir *idleReader) stop() { ir.timer.Stop() }

// LineReader splits NDJSON into lines of at most a given length, not
// counting the LF or CRLF that ends each (or a CR that ends the input).
// Lines are returned without their surrounding white space.
type LineReader struct {
	r   *bufio.Reader
	max int64
}

// NewLineReader returns a LineReader over r for lines of at most max bytes.
func NewLineReader(r io.Reader, max int64) *LineReader {
	return &LineReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// Next returns the next line, trimmed, in a new slice. A line longer than
// the maximum is read to its end and discarded, and Next returns
// errLineTooLong. At the end of input it returns the last unterminated line,
// then io.EOF.
func (lr *LineReader) Next() ([]byte, error) {
	var line []byte
	tooLong := false
	for {
		chunk, err := lr.r.ReadSlice('\n')
		if !tooLong {
			line = append(line, chunk...)
			// Neither the LF nor a CR before it counts. A CR at the end of
			// a chunk may be the first half of a CRLF still to come.
			content := bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
			if int64(len(content)) > lr.max {
				tooLong, line = true, nil
			}
		}
		switch {
		case err == nil:
			if tooLong {
				return nil, errLineTooLong
			}
			return bytes.TrimSpace(line), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case tooLong:
			return nil, errLineTooLong
		case len(line) > 0 && errors.Is(err, io.EOF):
			return bytes.TrimSpace(line), nil
		default:
			return nil, err
		}
	}
}

// LineBuffered reports whether a whole line is already buffered, so that the
// next call to Next will not wait for input.
func (lr *LineReader) LineBuffered() bool {
	buffered, _ := lr.r.Peek(lr.r.Buffered())
	return bytes.IndexByte(buffered, '\n') >= 0
}
